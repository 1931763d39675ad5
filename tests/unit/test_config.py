from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import ConfigError, env_overrides, load_settings


def test_defaults_follow_the_spec() -> None:
    settings = load_settings(environ={})
    assert settings.classes == ["electronics", "clothing", "home", "books", "toys"]
    assert (settings.data.splits.train, settings.data.splits.val, settings.data.splits.test) == (
        0.70,
        0.15,
        0.15,
    )
    assert settings.acceptance.accuracy_min == 0.85 and settings.model.dropout_rate == 0.3
    assert settings.training.batch_size == 32 and settings.training.early_stopping.patience == 10
    assert {rule.name for rule in settings.alerts.rules} >= {"model_accuracy_drop", "data_drift_detected"}


def test_overlay_file_sets_classes_and_bucket(tmp_path: Path) -> None:
    overlay = tmp_path / "site.yaml"
    overlay.write_text("data:\n  classes: [cat, dog]\nstorage:\n  root: s3://my-bucket/images\n")
    settings = load_settings(overlay, environ={})
    assert settings.classes == ["cat", "dog"]
    assert settings.storage.root == "s3://my-bucket/images"
    assert settings.data.splits.train == 0.70  # untouched keys keep their defaults


def test_environment_overrides_the_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "site.yaml"
    overlay.write_text("storage:\n  root: s3://from-file/x\n")
    env = {
        "MLOPS_CONFIG": str(overlay),
        "MLOPS__STORAGE__ROOT": "s3://from-env/y",
        "MLOPS__DATA__CLASSES": "[a, b, c]",
    }
    settings = load_settings(environ=env)
    assert settings.storage.root == "s3://from-env/y"
    assert settings.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("data:\n  clases: [a, b]\n", "data.clases: unknown key"),
        ("ingest:\n  max_rejected_share: 2\n", "ingest.max_rejected_share"),
        ("data:\n  splits: {train: 0.5, val: 0.2, test: 0.2}\n", "splits must sum to 1.0"),
        ("data:\n  classes: [a, a]\n", "class names must be unique"),
        ("model:\n  architecture: vgg99\n", "model.architecture"),
        ("model:\n  precision: int8\n  freeze_backbone: false\n", "int8 quantises the frozen backbone"),
        ("model:\n  precision: int8\n  feature_runtime: torch\n", "feature_runtime onnxruntime"),
        ("model:\n  precision: fp16\n", "model.precision"),
    ],
)
def test_wrong_key_or_value_names_it(tmp_path: Path, content: str, named: str) -> None:
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(content)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        load_settings(overlay, environ={})


def test_unknown_env_key_is_named() -> None:
    with pytest.raises(ConfigError, match="storage.bukket: unknown key"):
        load_settings(environ={"MLOPS__STORAGE__BUKKET": "x"})


def test_missing_overlay_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_env_values_are_parsed_as_yaml() -> None:
    assert env_overrides({"MLOPS__INGEST__WORKERS": "3", "OTHER": "x"}) == {"ingest": {"workers": 3}}
