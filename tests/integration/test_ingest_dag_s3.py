"""ingest_daily through Airflow (dag.test) against a real S3 endpoint on 127.0.0.1 over HTTP."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json

import boto3
import pytest

from ml.storage import S3Storage
from tests.conftest import REPO
from tests.hostile import encode, land_hostile_day, photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAY = dt.date(2026, 1, 5)
BAD_DAY = dt.date(2026, 1, 6)


@pytest.fixture
def s3_env(
    monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, s3_bucket: str, receiver, airflow_db
) -> S3Storage:
    aws = {
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", **aws}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_ALERTS",
        json.dumps({"conn_type": "slackwebhook", "password": f"{receiver.url}/slack/T0/B0"}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_PAGERDUTY_ALERTS",
        json.dumps(
            {
                "conn_type": "pagerduty_events",
                "password": "routing-key",
                "extra": {"events_url": receiver.url},
            }
        ),
    )
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", f"s3://{s3_bucket}/mlops")
    monkeypatch.setenv("MLOPS__INGEST__MAX_REJECTED_SHARE", "0.4")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    return S3Storage(client, s3_bucket, "mlops")


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "ingest_daily.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["ingest_daily"]


def run_dag(day: dt.date, run_no: int):
    logical = dt.datetime.combine(day, dt.time(run_no), tzinfo=dt.UTC)
    return load_dag().test(logical_date=logical, run_conf={"date": day.isoformat()})


def snapshot(storage: S3Storage, *prefixes: str) -> dict[str, str]:
    """Key -> ETag (MD5 of the content) for everything under the prefixes."""
    out = {}
    for prefix in prefixes:
        for key in storage.list(prefix):
            head = storage.client.head_object(Bucket=storage.bucket, Key=storage._object_key(key))
            out[key] = head["ETag"]
    return out


def land_raw(storage: S3Storage, objects: dict[str, bytes]) -> None:
    """Objects under keys S3 accepts as they are (folder markers, keys that are no safe path)."""
    for key, data in objects.items():
        storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}", Body=data)


def test_hostile_day_is_curated_or_quarantined_and_rerun_changes_nothing(s3_env: S3Storage) -> None:
    storage = s3_env
    spec = land_hostile_day(storage, DAY)
    base = f"landing/{DAY}"
    unsafe = {f"{base}/images/a//b.png": encode(photo(77), "PNG"), f"{base}/images/..": b"dot-dot"}
    land_raw(storage, {f"{base}/images/": b"", f"{base}/": b"", **unsafe})  # two folder markers
    spec.expect_file.update(dict.fromkeys(unsafe, "unsafe_key"))

    run = run_dag(DAY, 1)
    assert run.state == "success"

    result = json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json"))
    assert result["status"] == "published" and result["reconciled"]
    assert result["landed"]["objects"] == len(spec.expect_file) + len(spec.rows)
    assert result["curated"]["files"] + result["quarantined"]["files"] == len(spec.expect_file)
    assert result["curated"]["rows"] + result["quarantined"]["rows"] == len(spec.rows)

    ledger = list(
        csv.DictReader(io.StringIO(storage.read_bytes(f"reports/ingest/{DAY}/ledger.csv").decode()))
    )
    for entry in ledger:
        expected = (
            spec.expect_file[entry["ref"]]
            if entry["kind"] == "file"
            else spec.expect_row_reason[int(entry["ref"].split(":")[1])]
        )
        assert entry["reason"] == expected, entry

    assert result["landed"]["folder_markers"] == 2
    quarantined = {k for k, reason in spec.expect_file.items() if reason and k not in unsafe}
    kept = set(storage.list(f"quarantine/{DAY}"))
    for key in quarantined:  # originals kept exactly as landed
        target = key.replace(f"landing/{DAY}/", f"quarantine/{DAY}/")
        assert target in kept
        assert storage.read_bytes(target) == storage.read_bytes(key)
    for key, data in unsafe.items():  # under the hash of their key
        assert (
            storage.read_bytes(f"quarantine/{DAY}/unsafe_keys/{hashlib.sha256(key.encode()).hexdigest()}")
            == data
        )
    assert storage.exists("catalog/LATEST")
    assert storage.exists(f"reports/data_docs/{DAY}/index.html")

    before = snapshot(storage, "curated", "quarantine", "catalog")
    rerun = run_dag(DAY, 2)
    assert rerun.state == "success"
    assert snapshot(storage, "curated", "quarantine", "catalog") == before


def test_gate_failure_publishes_nothing_and_alerts_slack(s3_env: S3Storage, receiver) -> None:
    storage = s3_env
    base = f"landing/{BAD_DAY}"
    rows = []
    for i in range(10):
        storage.write_bytes(f"{base}/images/junk_{i}.jpg", b"not an image at all")
        rows.append(f"junk_{i}.jpg,toys")
    storage.write_bytes(f"{base}/images/ok.png", encode(photo(5), "PNG"))
    rows.append("ok.png,books")
    storage.write_bytes(f"{base}/labels.csv", ("filename,label\n" + "\n".join(rows) + "\n").encode())

    run = run_dag(BAD_DAY, 1)
    assert run.state == "failed"
    assert not storage.list(f"quarantine/{BAD_DAY}") and not storage.exists(f"catalog/days/{BAD_DAY}.parquet")
    assert not storage.list("curated")
    result = json.loads(storage.read_bytes(f"reports/ingest/{BAD_DAY}/result.json"))
    assert result["status"] == "rejected" and not result["gate"]["passed"]

    messages = receiver.wait_for("/slack/")
    assert len(messages) == 1
    text = messages[0].json()["text"]
    assert "ingest_daily" in text and "task ingest" in text and str(BAD_DAY) in text
    assert "rejected share" in text and f"reports/data_docs/{BAD_DAY}/index.html" in text
    assert not receiver.on("/v2/enqueue")  # a warning does not page


def test_nothing_landed_times_out_with_a_clear_alert(s3_env: S3Storage, receiver, monkeypatch) -> None:
    monkeypatch.setenv("MLOPS__INGEST__SENSOR_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("MLOPS__INGEST__SENSOR_POKE_SECONDS", "1")
    empty_day = dt.date(2026, 1, 9)
    run = run_dag(empty_day, 1)
    assert run.state == "failed"
    (message,) = receiver.wait_for("/slack/")
    text = message.json()["text"]
    assert f"nothing landed for {empty_day}" in text
    assert f"s3://{s3_env.bucket}/mlops/landing/{empty_day}/labels.csv" in text
