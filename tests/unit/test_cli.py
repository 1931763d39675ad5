from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ml.cli import EXIT_NOTHING, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(tmp_path / "store"))
    return tmp_path / "store"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if out else {}


def test_demo_data_then_ingest_prints_one_json_result(store: Path, capsys) -> None:
    code, landed = run(
        capsys, "demo-data", "--days", "1", "--per-day", "30", "--start", "2026-05-01", "--json"
    )
    assert code == EXIT_OK and landed["days"][0]["images"] == 30
    code, result = run(capsys, "ingest", "--date", "2026-05-01", "--json")
    assert code == EXIT_OK
    assert result["curated"]["new_images"] == 30 and result["reconciled"] and result["dataset_version"]


def test_config_overlay_is_applied_and_errors_name_the_key(tmp_path: Path, capsys) -> None:
    overlay = tmp_path / "o.yaml"
    overlay.write_text("data:\n  classes: [cats, dogs]\n")
    code, config = run(capsys, "config", "--config", str(overlay), "--json")
    assert code == EXIT_OK and config["data"]["classes"] == ["cats", "dogs"]
    overlay.write_text("data:\n  clases: [cats]\n")
    code, error = run(capsys, "config", "--config", str(overlay), "--json")
    assert code == EXIT_USAGE and "data.clases: unknown key" in error["error"]


def test_nothing_landed_and_rejected_batches_have_their_own_exit_codes(store: Path, capsys) -> None:
    code, error = run(capsys, "ingest", "--date", "2026-05-02", "--json")
    assert code == EXIT_NOTHING and error["type"] == "nothing_landed"
    (store / "landing/2026-05-02/images").mkdir(parents=True)
    (store / "landing/2026-05-02/images/a.jpg").write_bytes(b"junk")
    (store / "landing/2026-05-02/labels.csv").write_text("filename,label\na.jpg,books\n")
    code, error = run(capsys, "ingest", "--date", "2026-05-02", "--json")
    assert code == EXIT_REJECTED and error["result"]["gate"]["passed"] is False


def test_bad_arguments_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["ingest", "--date", "2026-13-01"])
    assert caught.value.code == EXIT_USAGE
    code, error = run(capsys, "demo-data", "--drift", "fog:0.5", "--json")
    assert code == EXIT_USAGE and "fog" in error["error"]


def test_console_script_is_installed() -> None:
    mlops = shutil.which("mlops", path=str(Path(sys.executable).parent))
    assert mlops, "the mlops console script is not installed in the venv"
    out = subprocess.run([mlops, "--help"], capture_output=True, text=True, check=True).stdout
    assert "ingest" in out and "demo-data" in out


def test_drift_without_a_champion_says_there_is_nothing_to_compare(
    store: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS__MLFLOW__TRACKING_URI", f"sqlite:///{store.parent / 'mlflow.db'}")
    code, result = run(capsys, "drift", "--date", "2026-05-01", "--json")
    assert code == EXIT_OK and result["status"] == "no_reference" and result["drift_detected"] is False


def test_train_with_nothing_ingested_has_nothing_to_do(store: Path, capsys) -> None:
    code, result = run(capsys, "train", "--json")
    assert code == EXIT_OK and result["status"] == "no_data" and "no dataset version" in result["reason"]


def test_lineage_and_forget_refuse_bad_and_unknown_ids(store: Path, capsys) -> None:
    code, error = run(capsys, "lineage", "not-an-id.png", "--json")
    assert code == EXIT_USAGE and "not a request id" in error["error"]
    code, error = run(capsys, "forget", "ab" * 32, "--reason", "GDPR request", "--json")
    assert code == EXIT_NOTHING and error["type"] == "not_found"
    with pytest.raises(SystemExit) as caught:
        main(["forget", "ab" * 32])  # no --reason
    assert caught.value.code == EXIT_USAGE
