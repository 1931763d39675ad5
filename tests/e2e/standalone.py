"""One way to run a real ``airflow standalone`` for an e2e module, isolated under a temp folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml.http import free_port
from tests.conftest import QUICK_VALIDATION, setting_overrides


@contextlib.contextmanager
def standalone(root: Path, **extra_env: str) -> Iterator[Path]:
    """Airflow (scheduler, API server, LocalExecutor) with its own home, DB, port, storage and MLflow."""
    from ml.ops import stack

    home = root / "airflow"
    home.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_HOME", str(home))
        env.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home}/airflow.db")
        env.setenv("AIRFLOW__API__PORT", str(free_port()))
        env.setenv("MLOPS__STORAGE__ROOT", str(root / "store"))
        env.setenv("MLOPS__MLFLOW__TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        env.setenv("MLOPS__SERVING__STATE_DIR", str(root / "serving"))
        env.setenv("MLOPS__SERVING__PORT", str(free_port()))
        env.setenv("MLOPS_MLFLOW_UI_PORT", str(free_port()))
        for key, value in {**setting_overrides(**QUICK_VALIDATION), **extra_env}.items():
            env.setenv(key, value)
        assert stack.start_airflow(wait_seconds=240) == 0, (home / "standalone.log").read_text()[-3000:]
        stack.settle_unpause_runs(stack.Api.as_admin())  # their retrain must not meet the tests' days
        try:
            yield home
        finally:
            stack.down()
