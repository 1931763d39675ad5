from __future__ import annotations

from pathlib import Path

import pytest

from ml import registry
from ml.config import Settings, load_settings
from ml.storage import LocalStorage


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(environ={"MLOPS__MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def new_version(settings: Settings, tmp_path: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri(settings))
    experiment = registry.client(settings).create_experiment(
        f"e-{len(list(tmp_path.iterdir()))}", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        (tmp_path / "model.txt").write_text("weights")
        mlflow.log_artifact(str(tmp_path / "model.txt"), "model")
    mlflow_client = registry.client(settings)
    name = settings.mlflow.registered_model
    if not mlflow_client.search_registered_models(f"name='{name}'"):
        mlflow_client.create_registered_model(name)
    return str(
        mlflow_client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    )


def test_promotion_moves_the_champion_alias_and_keeps_an_audit_trail(
    settings: Settings, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "store")
    assert registry.version_for_alias(settings, registry.CHAMPION) is None
    first = new_version(settings, tmp_path)
    approval = registry.promote(settings, storage, first, approved_by="alice", note="first model")
    assert approval.previous_champion is None
    assert registry.version_for_alias(settings, registry.CHAMPION) == first
    second = new_version(settings, tmp_path)
    approval = registry.promote(settings, storage, second, approved_by="bob", note="weekly retrain")
    assert approval.previous_champion == first
    assert registry.version_for_alias(settings, registry.CHAMPION) == second
    tags = registry.client(settings).get_model_version(settings.mlflow.registered_model, second).tags
    assert tags["approved_by"] == "bob" and tags["approval_note"] == "weekly retrain"
    history = registry.audit_log(storage)
    assert [(h["version"], h["approved_by"], h["previous_champion"]) for h in history] == [
        (first, "alice", None),
        (second, "bob", first),
    ]


def test_promoting_a_missing_version_fails_clearly(settings: Settings, tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    new_version(settings, tmp_path)
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        registry.promote(settings, LocalStorage(tmp_path / "s"), "99", approved_by="eve")
