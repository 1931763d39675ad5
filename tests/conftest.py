"""Test session setup: a private Airflow home and database, telemetry off, local servers as fixtures.

The environment is set before anything imports Airflow, so every test (and every subprocess it
starts) uses a throwaway SQLite database and this checkout's dags/ and plugins/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="mlops-test-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW_CONFIG": str(REPO / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "DO_NOT_TRACK": "1",
        "SCARF_ANALYTICS": "false",
        "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
        "GX_ANALYTICS_ENABLED": "false",
        "EVIDENTLY_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": tempfile.mkdtemp(prefix="mlops-test-bentoml-"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for name in [n for n in os.environ if n.startswith("MLOPS__") or n == "MLOPS_CONFIG"]:
    del os.environ[name]  # tests start from the repo's params.yaml only


def setting_overrides(**settings: Any) -> dict[str, str]:
    """``section__key=value`` keywords as ``MLOPS__SECTION__KEY`` variables."""
    return {
        f"MLOPS__{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in settings.items()
    }


# Every retrain validates its model; tests that are not about validation run it on smaller samples
# (the same code and checks, a third of the time). tests/integration/test_validate.py sets its own.
NO_ACCEPTANCE_BAR = {  # a world whose model only has to exist: every metric floor at 0
    "acceptance__accuracy_min": 0,
    "acceptance__precision_min": 0,
    "acceptance__recall_min": 0,
    "acceptance__f1_macro_min": 0,
}
QUICK_VALIDATION = {
    "validation__robustness_sample": 16,
    "validation__adversarial_sample": 2,
    "validation__deletion_sample": 12,
    "validation__explain_per_class": 1,
    "validation__explain_confusions": 2,
    "validation__bootstrap": 200,
}


def world_env(root: Path, **settings: Any) -> dict[str, str]:
    """The settings environment of a test world under ``root``: its own storage, MLflow store,
    deployment state and service port, smaller validation samples, then ``section__key=value``
    overrides on top."""
    from ml.http import free_port

    return {
        "MLOPS__STORAGE__ROOT": str(root / "store"),
        "MLOPS__MLFLOW__TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLOPS__SERVING__STATE_DIR": str(root / "serving"),
        "MLOPS__SERVING__PORT": str(free_port()),
        **setting_overrides(**(QUICK_VALIDATION | settings)),
    }


@pytest.fixture(scope="session")
def make_settings() -> Callable[..., Any]:
    """``make_settings(section__key=value, ...)``: settings from params.yaml and these overrides only."""
    from ml.config import load_settings

    return lambda **settings: load_settings(environ=setting_overrides(**settings))


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database for this test session."""
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP endpoint (moto) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    from ml.http import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """An empty bucket on the local endpoint; the endpoint is reset afterwards."""
    import boto3
    import requests

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="mlops-test")
    yield "mlops-test"
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10)


@pytest.fixture
def receiver() -> Iterator[object]:
    """A local HTTP server that records every request (stands in for Slack and PagerDuty)."""
    from tests.receivers import Receiver

    with Receiver() as server:
        yield server
