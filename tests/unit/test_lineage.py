"""Lineage and erasure on a small real world: local storage, a SQLite MLflow registry, two catalog days.

Day 1 holds images a, b, c; day 2 holds d, e, f. Model v1 was trained on day 1's dataset version,
v2 on day 2's (days 1 and 2). A request answered by v2 logged its image, which was later landed
as image d; it was labelled through /feedback. Day 2 also landed a copy of a that was quarantined.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml import registry
from ml.cli import EXIT_NOTHING, EXIT_OK, main
from ml.config import Settings
from ml.data import catalog
from ml.layout import (
    CATALOG_ERASURES_KEY,
    PREDICTIONS_PREFIX,
    DayLayout,
    curated_key,
    feature_shard_key,
    feedback_claim_key,
    request_image_key,
)
from ml.ops.erasure import forget
from ml.ops.lineage import Evidence, IdKind, UnknownId, lineage
from ml.serving.binding import RequestIds
from ml.serving.log import PredictionLog
from ml.storage import LocalStorage, Storage

DAY1, DAY2 = dt.date(2026, 3, 1), dt.date(2026, 3, 2)
IMAGES = {  # name: (day, label, split)
    "a": (DAY1, "cats", "train"),
    "b": (DAY1, "dogs", "val"),
    "c": (DAY1, "cats", "test"),
    "d": (DAY2, "dogs", "train"),
    "e": (DAY2, "cats", "train"),
    "f": (DAY2, "dogs", "test"),
}
CACHE_ID = "0123456789abcdef"


def landed_bytes(name: str) -> bytes:
    return f"landed {name}".encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def curated_sha(name: str) -> str:
    return sha(f"curated {name}".encode())


@dataclass(frozen=True)
class World:
    settings: Settings
    storage: Storage
    versions: dict[dt.date, str]  # dataset version of each day
    runs: dict[str, str]  # model version -> run id
    request_id: str


def land_and_curate(storage: Storage) -> dict[dt.date, str]:
    """Landed and curated objects, ledgers, partitions, dataset versions and a feature shard."""
    rows: dict[dt.date, list[dict[str, Any]]] = {DAY1: [], DAY2: []}
    for name, (day, label, split) in IMAGES.items():
        source_key = f"{DayLayout(day).images}/{name}.png"
        storage.write_bytes(source_key, landed_bytes(name))
        storage.write_bytes(curated_key(curated_sha(name), "png"), f"curated {name}".encode())
        rows[day].append(
            {column: "" for column in catalog.CATALOG_COLUMNS}
            | {
                "sha256": curated_sha(name),
                "label": label,
                "split": split,
                "day": day.isoformat(),
                "curated_key": curated_key(curated_sha(name), "png"),
                "source_key": source_key,
                "source_sha256": sha(landed_bytes(name)),
            }
        )
    copy = f"{DayLayout(DAY2).images}/copy-of-a.png"  # quarantined on day 2 (label conflict)
    storage.write_bytes(copy, landed_bytes("a"))
    storage.write_bytes(f"{DayLayout(DAY2).quarantine}/images/copy-of-a.png", landed_bytes("a"))
    for day, day_rows in rows.items():
        ledger = [("file", row["source_key"], "curated", row["sha256"]) for row in day_rows]
        if day == DAY2:
            ledger.append(("file", copy, "quarantined", curated_sha("a")))
        write_ledger(storage, day, ledger)
        frame = pd.DataFrame(day_rows).sort_values("sha256", ignore_index=True)
        storage.write_bytes(catalog.partition_key(day), catalog.to_parquet_bytes(frame))
    shas = np.array(sorted(curated_sha(n) for n in "abc"))
    buffer = io.BytesIO()
    np.savez(buffer, sha256=shas, features=np.arange(24, dtype=np.float16).reshape(3, 2, 4))
    storage.write_bytes(feature_shard_key(CACHE_ID, DAY1.isoformat()), buffer.getvalue())
    return {day: catalog.write_version(storage, day)["version"] for day in (DAY1, DAY2)}


def write_ledger(storage: Storage, day: dt.date, entries: list[tuple[str, str, str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["kind", "ref", "outcome", "reason", "detail", "label", "sha256", "note"])
    writer.writerows([kind, ref, outcome, "", "", "", digest, ""] for kind, ref, outcome, digest in entries)
    storage.write_bytes(DayLayout(day).ledger, buffer.getvalue().encode())


def register(settings: Settings, root: Path, dataset_version: str) -> tuple[str, str]:
    """A run and a registered version tagged the way ``ml.training.pipeline`` tags them."""
    client = registry.client(settings)
    experiment = client.get_experiment_by_name("lineage") or client.get_experiment(
        client.create_experiment("lineage", artifact_location=(root / "artifacts").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    client.log_param(run.info.run_id, "dataset_version", dataset_version)
    (root / "model.txt").write_text("weights")
    client.log_artifact(run.info.run_id, str(root / "model.txt"), "model")
    client.set_terminated(run.info.run_id)
    name = settings.mlflow.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = str(
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    )
    for key, value in {"dataset_version": dataset_version, "run_id": run.info.run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    return version, run.info.run_id


def log_request(storage: Storage) -> str:
    """A prediction by v2 whose image (later landed as d) was logged, and its feedback claim."""
    request_id = RequestIds(b"s" * 32).mint("2", "anonymous")
    at = "2026-03-05T10:00:00.000+00:00"
    writer = PredictionLog(storage)
    writer.add_blob(request_image_key(at[:10], request_id), landed_bytes("d"))
    record = {"request_id": request_id, "time": at, "model_version": "2", "track": "stable"}
    record |= {
        "predicted_class": "cats",
        "confidence": 0.61,
        "image_key": request_image_key(at[:10], request_id),
    }
    writer.add(PREDICTIONS_PREFIX, record)
    assert writer.close()
    claim = {
        "request_id": request_id,
        "label": "dogs",
        "time": "2026-03-05T11:00:00.000+00:00",
        "bound": True,
    }
    storage.write_bytes(feedback_claim_key(request_id.split("-")[0]), json.dumps(claim).encode())
    return request_id


def settings_for(make_settings: Callable[..., Settings], root: Path, store: Path) -> Settings:
    return make_settings(storage__root=store, mlflow__tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, make_settings: Callable[..., Settings]) -> World:
    root = tmp_path_factory.mktemp("lineage")
    settings = settings_for(make_settings, root, root / "store")
    storage = LocalStorage(root / "store")
    versions = land_and_curate(storage)
    runs = dict(register(settings, root, versions[day]) for day in (DAY1, DAY2))
    return World(settings, storage, versions, runs, log_request(storage))


@pytest.fixture
def copy(world: World, tmp_path: Path, make_settings: Callable[..., Settings]) -> World:
    """The world with its own copy of storage (same registry), for tests that change storage."""
    store = tmp_path / "store"
    shutil.copytree(Path(world.storage.root), store)
    mlflow_root = Path(world.settings.mlflow.tracking_uri.removeprefix("sqlite:///")).parent
    settings = settings_for(make_settings, mlflow_root, store)
    return World(settings, LocalStorage(store), world.versions, world.runs, world.request_id)


def test_a_request_leads_to_its_model_run_dataset_days_and_landed_image(world: World) -> None:
    traced = lineage(world.settings, world.storage, world.request_id)
    assert traced.kind == IdKind.REQUEST
    prediction, model = traced.prediction, traced.model
    assert prediction and model and model.dataset
    assert (prediction.model_version, prediction.predicted_class, prediction.feedback_label) == (
        "2",
        "cats",
        "dogs",
    )
    assert prediction.image_sha256 == sha(landed_bytes("d"))
    assert model.run_id == world.runs["2"] and model.dataset_version == world.versions[DAY2]
    assert model.dataset.days == ("2026-03-01", "2026-03-02") and model.dataset.intact
    assert model.dataset.landing == ("landing/2026-03-01", "landing/2026-03-02")
    assert [(i.sha256, i.source_key, i.landed_present) for i in traced.images] == [
        (curated_sha("d"), "landing/2026-03-02/images/d.png", True)
    ]
    assert lineage(world.settings, world.storage, world.request_id, day=DAY2 + dt.timedelta(days=3)) == traced


def test_a_model_version_gives_its_run_dataset_days_and_images_per_split(world: World) -> None:
    model = lineage(world.settings, world.storage, "v1").model
    assert model and model.dataset
    assert model.run_id == world.runs["1"] and model.params["dataset_version"] == world.versions[DAY1]
    assert model.dataset.days == ("2026-03-01",)
    assert model.dataset.per_split == {"train": 1, "val": 1, "test": 1} and model.dataset.rows == 3


def test_an_image_leads_to_its_rows_and_every_model_whose_dataset_holds_it(world: World) -> None:
    traced = lineage(world.settings, world.storage, curated_sha("a"))
    (image,) = traced.images
    assert (image.day, image.label, image.split, image.source_key) == (
        "2026-03-01",
        "cats",
        "train",
        "landing/2026-03-01/images/a.png",
    )
    assert [(use.model_version, use.evidence) for use in traced.models] == [
        ("1", Evidence.VERIFIED),
        ("2", Evidence.VERIFIED),
    ]
    by_landed_hash = lineage(world.settings, world.storage, sha(landed_bytes("e")))
    assert [i.sha256 for i in by_landed_hash.images] == [curated_sha("e")]
    assert [use.model_version for use in by_landed_hash.models] == ["2"]


def test_unknown_and_malformed_ids_fail_clearly(world: World) -> None:
    with pytest.raises(UnknownId, match="no catalog image"):
        lineage(world.settings, world.storage, "0" * 64)
    with pytest.raises(UnknownId, match="v99"):
        lineage(world.settings, world.storage, "v99")
    forged = world.request_id.replace(world.request_id[:4], "ffff", 1)
    with pytest.raises(UnknownId, match="no prediction with request id"):
        lineage(world.settings, world.storage, forged)
    with pytest.raises(ValueError, match="not a request id"):
        lineage(world.settings, world.storage, "books.png")


def test_forget_erases_the_image_everywhere_and_records_it(copy: World) -> None:
    storage, target = copy.storage, curated_sha("a")
    before = catalog.version_rows(storage, catalog.read_version_id(storage, copy.versions[DAY2]))
    erasure = forget(copy.settings, storage, sha(landed_bytes("a")), reason="GDPR request 17", by="dpo")

    assert erasure.sha256 == target and erasure.days == ("2026-03-01",)
    assert [use.model_version for use in erasure.models] == ["1", "2"]
    assert set(erasure.deleted) == {
        curated_key(target, "png"),
        "landing/2026-03-01/images/a.png",
        "landing/2026-03-02/images/copy-of-a.png",
        "quarantine/2026-03-02/images/copy-of-a.png",
    }
    assert not any(storage.exists(key) for key in erasure.deleted)

    version, rows = catalog.dataset_rows(storage)
    assert version["version"] == erasure.latest_dataset_version != copy.versions[DAY2]
    assert target not in set(rows["sha256"]) and version["rows"] == 5
    expected = before[before["sha256"] != target].sort_values("sha256", ignore_index=True)
    pd.testing.assert_frame_equal(rows, expected)
    with pytest.raises(catalog.DatasetIntegrityError):
        catalog.version_rows(storage, catalog.read_version_id(storage, copy.versions[DAY1]))

    shard_key = feature_shard_key(CACHE_ID, "2026-03-01")
    assert erasure.feature_rows == {shard_key: 1}
    with np.load(io.BytesIO(storage.read_bytes(shard_key))) as shard:
        assert list(shard["sha256"]) == sorted(curated_sha(n) for n in "bc")
        kept = [i for i, s in enumerate(sorted(curated_sha(n) for n in "abc")) if s != target]
        assert np.array_equal(shard["features"], np.arange(24, dtype=np.float16).reshape(3, 2, 4)[kept])

    (record,) = [json.loads(line) for line in storage.read_bytes(CATALOG_ERASURES_KEY).decode().splitlines()]
    assert (
        record["reason"] == "GDPR request 17" and record["erased_by"] == "dpo" and record["sha256"] == target
    )
    with pytest.raises(UnknownId, match="erased at .* by dpo .*: v1, v2"):
        lineage(copy.settings, storage, target)
    with pytest.raises(UnknownId, match="erased"):
        forget(copy.settings, storage, target, reason="again", by="dpo")
    old = lineage(copy.settings, storage, "v1").model
    assert old and old.dataset and not old.dataset.intact and old.dataset.rows == 3


def test_the_cli_prints_lineage_as_json_and_unknown_ids_exit_non_zero(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", str(world.storage.root))
    monkeypatch.setenv("MLOPS__MLFLOW__TRACKING_URI", world.settings.mlflow.tracking_uri)
    assert main(["lineage", world.request_id, "--json"]) == EXIT_OK
    traced = json.loads(capsys.readouterr().out)
    assert traced["model"]["dataset"]["per_split"] == {"train": 3, "val": 1, "test": 2}
    assert main(["lineage", "v2"]) == EXIT_OK
    assert "images_per_split: train=3 val=1 test=2" in capsys.readouterr().out
    assert main(["lineage", "v7", "--json"]) == EXIT_NOTHING
    assert json.loads(capsys.readouterr().out)["type"] == "not_found"
