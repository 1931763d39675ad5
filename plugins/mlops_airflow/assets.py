"""The Assets DAGs hand each other work through."""

from __future__ import annotations

from airflow.sdk import Asset

CURATED_IMAGES = Asset(name="curated_images", uri="mlops://dataset/curated-images")
RETRAIN_REQUESTED = Asset(name="retrain_requested", uri="mlops://requests/retrain")
