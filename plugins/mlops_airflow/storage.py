"""Storage for DAG tasks: ``s3://`` roots go through the amazon provider's Airflow connection."""

from __future__ import annotations

from typing import Any

from ml.config import Settings
from ml.storage import Storage, encryption_args, open_storage


def dag_storage(settings: Settings) -> Storage:
    """The configured storage; S3 credentials and endpoint from connection ``storage.aws_conn_id``."""

    def client() -> Any:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=settings.storage.aws_conn_id).get_conn()

    return open_storage(settings.storage.root, s3_client_factory=client, encryption=encryption_args(settings))
