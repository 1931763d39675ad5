"""Ingestion under real faults: the S3 endpoint stops mid-ingest; the ingest process is SIGKILLed.

Each test asserts what was kept: nothing half-published while the fault lasts, then after a
re-run every landed object curated or quarantined with a reason, a consistent catalog, and a
second re-run that changes nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import psutil
import pytest
import requests
from moto.server import ThreadedMotoServer

from ml.config import load_settings
from ml.data import catalog
from ml.data.ingest import ingest_day
from ml.http import free_port
from ml.storage import LocalStorage, S3Storage, Storage, open_storage
from tests.hostile import CLASSES, encode, photo

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault]

DAY = dt.date(2026, 4, 1)
IMAGES = 300
BUCKET = "fault-ingest"


def land_day(storage: Storage, day: dt.date, images: int = IMAGES) -> int:
    """``images`` JPEGs with rows, plus a truncated file, an orphan and a row whose file never landed.

    Returns the number of labels.csv rows.
    """
    base = f"landing/{day.isoformat()}"
    rows = []
    for index in range(images):
        name = f"img_{index:04d}.jpg"
        storage.write_bytes(f"{base}/images/{name}", encode(photo(index), "JPEG", quality=90))
        rows.append(f"{name},{CLASSES[index % 5]}")
    truncated = encode(photo(9000, (300, 200)), "JPEG")
    storage.write_bytes(f"{base}/images/truncated.jpg", truncated[: len(truncated) // 2])
    storage.write_bytes(f"{base}/images/orphan.jpg", encode(photo(9001), "JPEG"))
    rows += ["truncated.jpg,toys", "never_landed.jpg,books"]
    storage.write_bytes(f"{base}/labels.csv", ("filename,label\n" + "\n".join(rows) + "\n").encode())
    return len(rows)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def assert_all_accounted_for(storage: Storage, day: dt.date, rows: int) -> dict[str, object]:
    """Every landed object once in the ledger, settled; the catalog's version reads back verified."""
    listed = [
        info.key
        for info in storage.list_objects(f"landing/{day}")
        if not info.is_folder_marker and not info.key.endswith("/labels.csv")
    ]
    text = storage.read_bytes(f"reports/ingest/{day}/ledger.csv").decode()
    entries = list(csv.DictReader(io.StringIO(text)))
    assert sorted(e["ref"] for e in entries if e["kind"] == "file") == sorted(listed)
    assert len([e for e in entries if e["kind"] == "row"]) == rows
    for entry in entries:
        assert entry["outcome"] == "curated" or (entry["outcome"] == "quarantined" and entry["reason"]), entry
    result = json.loads(storage.read_bytes(f"reports/ingest/{day}/result.json"))
    assert result["status"] == "published" and result["reconciled"]
    version, frame = catalog.dataset_rows(storage)  # every partition's sha256 checked
    assert version["version"] == result["dataset_version"]
    assert len(frame) == result["curated"]["new_images"] > 0
    assert all(storage.exists(key) for key in frame["curated_key"])
    for entry in entries:
        if entry["kind"] == "file" and entry["outcome"] == "quarantined":
            kept = entry["ref"].replace(f"landing/{day}/", f"quarantine/{day}/")
            assert storage.read_bytes(kept) == storage.read_bytes(entry["ref"])
    return result


def published(storage: Storage) -> dict[str, bytes]:
    return {
        key: storage.read_bytes(key) for p in ("curated", "quarantine", "catalog") for key in storage.list(p)
    }


def assert_nothing_published(storage: Storage, day: dt.date) -> None:
    assert not storage.exists(catalog.partition_key(day))
    assert not storage.list("catalog/versions") and not storage.exists("catalog/LATEST")


# -- the S3 endpoint stops mid-ingest ---------------------------------------------------------------


class RestartableMoto:
    """A moto S3 server on one port that can be stopped and started again; its state lives in this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # shuts the listening socket: connections are refused from here on
            self._server = None


@pytest.fixture
def moto() -> Iterator[RestartableMoto]:
    server = RestartableMoto()
    server.start()
    yield server
    server.stop()
    server.start()  # to empty this process's S3 state, whatever the test left running
    requests.post(f"{server.url}/moto-api/reset", timeout=10)
    server.stop()


def test_s3_endpoint_stops_mid_ingest_then_rerun_loses_nothing(moto: RestartableMoto) -> None:
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    settings = load_settings(
        environ={"MLOPS__STORAGE__ENDPOINT_URL": moto.url, "MLOPS__INGEST__WORKERS": "2"}
    )
    storage = open_storage(f"s3://{BUCKET}/mlops", endpoint_url=moto.url, timeout_seconds=5)
    assert isinstance(storage, S3Storage)
    rows = land_day(storage, DAY)
    storage.client.put_object(Bucket=BUCKET, Key=f"mlops/landing/{DAY}/images/", Body=b"")  # a folder marker
    watcher = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ingest_day(settings, storage, DAY)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(
        lambda: (
            not thread.is_alive()
            or watcher.list_objects_v2(Bucket=BUCKET, Prefix="mlops/curated/", MaxKeys=1)["KeyCount"] > 0
        ),
        timeout=300,
        what="the first curated image",
        poll=0.02,
    )
    assert thread.is_alive(), f"ingest ended before the endpoint stopped: {failure}"
    moto.stop()  # mid-publish: curated images are being written, the catalog is not yet
    thread.join(timeout=180)
    assert not thread.is_alive(), "ingest hung on a stopped endpoint"
    assert failure, "ingest succeeded although the endpoint stopped"
    assert "Could not connect to the endpoint URL" in str(failure[0]) and moto.url in str(failure[0])

    moto.start()  # the same port, the same state
    assert_nothing_published(storage, DAY)
    assert watcher.list_objects_v2(Bucket=BUCKET, Prefix="mlops/curated/")["KeyCount"] < IMAGES

    first = ingest_day(settings, storage, DAY).to_dict()
    assert_all_accounted_for(storage, DAY, rows)
    assert first["landed"]["folder_markers"] == 1
    before = published(storage)
    assert ingest_day(settings, storage, DAY).to_dict() == first
    assert published(storage) == before


# -- the ingest process is SIGKILLed ----------------------------------------------------------------


MLOPS_INGEST = [str(Path(sys.executable).parent / "mlops"), "ingest", "--date", DAY.isoformat(), "--json"]


def start_ingest(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(MLOPS_INGEST, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_ingest(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(MLOPS_INGEST, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def workers_started(process: subprocess.Popen[bytes], found: list[psutil.Process]) -> Callable[[], bool]:
    """True once ``process`` has forked its two inspection workers (recorded in ``found``)."""

    def check() -> bool:
        found[:] = psutil.Process(process.pid).children()
        return len(found) >= 2

    return check


def kill_when(process: subprocess.Popen[bytes], condition: Callable[[], bool], what: str) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"ingest exited ({process.returncode}) before {what}")
        return condition()

    wait_until(ready, timeout=300, what=what)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_sigkilled_ingest_then_rerun_loses_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    rows = land_day(storage, DAY)
    spool = tmp_path / "spool"
    env = os.environ | {
        "MLOPS__STORAGE__ROOT": storage.root.as_uri(),
        "MLOPS__INGEST__SPOOL_DIR": str(spool),
        "MLOPS__INGEST__WORKERS": "2",
    }

    # 1. killed while its worker processes decode: they die with it, its spool stays behind
    process = start_ingest(env)
    workers: list[psutil.Process] = []
    kill_when(process, workers_started(process, workers), "its worker processes")
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes outlived the killed ingest: {alive}"
    (left_by_first,) = spool.iterdir()
    assert_nothing_published(storage, DAY)

    # 2. killed mid-publish: some curated images written, the catalog not yet
    process = start_ingest(env)
    kill_when(process, lambda: any((storage.root / "curated").rglob("*.jpg")), "the first curated image")
    assert_nothing_published(storage, DAY)
    assert len(list((storage.root / "curated").rglob("*.jpg"))) < IMAGES
    (left_by_second,) = spool.iterdir()  # the second run removed the first one's
    assert left_by_second != left_by_first

    # 3. the re-run completes: everything accounted for, the killed run's spool removed
    assert run_ingest(env)["reconciled"]
    first = assert_all_accounted_for(storage, DAY, rows)
    assert not list(spool.iterdir())
    before = published(storage)

    # 4. and once more: nothing changes
    run_ingest(env)
    assert json.loads(storage.read_bytes(f"reports/ingest/{DAY}/result.json")) == first
    assert published(storage) == before


# -- a sharded ingest: a shard's worker is SIGKILLed --------------------------------------------------


def shard_command(shard: int) -> list[str]:
    """What the ``inspect_shard`` task runs, as a process of its own (a Celery worker's task)."""
    code = (
        "import datetime as dt; from ml.config import load_settings; from ml.data import shards; "
        "from ml.storage import storage_from_settings; settings = load_settings(); "
        "shards.inspect_shard(settings, storage_from_settings(settings), "
        f"dt.date.fromisoformat('{DAY}'), {shard})"
    )
    return [sys.executable, "-c", code]


def test_a_shard_whose_worker_is_killed_is_retried_and_nothing_is_published_twice_or_lost(
    tmp_path: Path,
) -> None:
    from ml.data import shards
    from ml.layout import DayLayout

    storage = LocalStorage(tmp_path / "store")
    rows = land_day(storage, DAY)
    env = os.environ | {"MLOPS__STORAGE__ROOT": storage.root.as_uri(), "MLOPS__INGEST__WORKERS": "1"}
    settings = load_settings(environ={"MLOPS__STORAGE__ROOT": storage.root.as_uri()})
    shards.plan_day(settings, storage, DAY, 2)
    subprocess.run(shard_command(0), env=env, check=True, timeout=600)

    # shard 1's worker dies (SIGKILL) while its decoder process works: no result, nothing published
    process = subprocess.Popen(
        shard_command(1), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    decoders: list[psutil.Process] = []

    def decoding() -> bool:
        decoders[:] = psutil.Process(process.pid).children()
        return len(decoders) >= 1

    kill_when(process, decoding, "its decoder process")
    psutil.wait_procs(decoders, timeout=10)
    assert not storage.exists(DayLayout(DAY).shard_result(1))
    with pytest.raises(shards.ShardMissing):
        shards.merge_day(settings, storage, DAY)
    assert_nothing_published(storage, DAY)

    # the retry (Airflow's, here by hand) completes the shard; the merge publishes every object once
    subprocess.run(shard_command(1), env=env, check=True, timeout=600)
    result = shards.merge_day(settings, storage, DAY)
    assert result.reconciled
    first = assert_all_accounted_for(storage, DAY, rows)
    curated = storage.list("curated")
    assert len(curated) == len(set(curated)) == first["curated"]["files"]
    assert not storage.list(DayLayout(DAY).staging)  # the staging area went with the publish
