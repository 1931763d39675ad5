"""ml.serving without HTTP: upload checks, routing, adaptive batching, deployment state, prediction log."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ml.config import load_settings
from ml.data.images import ImageLimits
from ml.layout import FEEDBACK_PREFIX, PREDICTIONS_PREFIX
from ml.serving.auth import (
    KeyConfigError,
    api_keys,
    authenticate,
    is_loopback,
    key_id,
    key_matches,
    key_table,
)
from ml.serving.batching import AdaptiveBatcher
from ml.serving.binding import Bound, RequestIds, SecretError, load_secret
from ml.serving.bundle import BundleMeta, Outputs, ServingModel, write_bundle
from ml.serving.lifecycle import listening_hosts, refuse_open_endpoint
from ml.serving.log import PredictionLog
from ml.serving.predictor import Predictor, canary_bucket
from ml.serving.state import DeploymentState, read_state, update_state, write_state
from ml.serving.uploads import BadRequest, decode_upload
from ml.storage import LocalStorage, read_jsonl
from ml.training.model import SERVING_OUTPUTS, Classifier, Head, ServingGraph, export_onnx
from ml.training.preprocessing import Preprocessing, batch_arrays, decode_rgb
from tests.hostile import encode, photo, png_bomb

CLASSES = ["electronics", "clothing", "home", "books", "toys"]
SIZE = 32
LIMITS = ImageLimits.from_settings(load_settings(environ={}).ingest)
PREP = Preprocessing(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(torch.relu(self.conv(images))), 1)


def make_bundle(folder: Path, version: str, seed: int) -> Path:
    """A real ONNX bundle of a small random classifier (logits + features)."""
    torch.manual_seed(seed)
    model = Classifier(TinyBackbone(), Head(6, len(CLASSES), 0.0)).eval()
    onnx = folder / f"src-{version}" / "model.onnx"
    export_onnx(ServingGraph(model), onnx, SIZE, SERVING_OUTPUTS)
    pca = onnx.parent / "pca.npz"
    np.savez(pca, mean=np.zeros(6, np.float32), components=np.eye(3, 6, dtype=np.float32))
    meta = BundleMeta(version, "2026-01-01", f"run-{version}", CLASSES, SIZE, PREP.mean, PREP.std)
    bundle = folder / f"v{version}"
    write_bundle(bundle, onnx, pca, meta)
    return bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return {version: make_bundle(folder, version, seed) for version, seed in (("1", 0), ("2", 1))}


def png(seed: int = 1, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    return encode(photo(seed, size, mode), "PNG")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_file"),
        (b"%PDF-1.7 not an image at all", 415, "not_an_image"),
        (encode(photo(1), "GIF"), 415, "format_not_allowed"),
        (png()[:60], 400, "corrupt_image"),
        (png_bomb(), 413, "too_many_pixels"),
    ],
    ids=["empty", "pdf", "gif", "truncated", "bomb"],
)
def test_bad_uploads_are_client_errors_with_a_reason(data: bytes, status: int, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_upload(data, LIMITS, PREP)
    assert (caught.value.status, caught.value.code) == (status, code)


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("PNG", "RGBA", (40, 30)),
        ("JPEG", "L", (8, 8)),
        ("TIFF", "I;16", (50, 20)),
        ("WEBP", "RGB", (33, 77)),
        ("BMP", "RGB", (64, 64)),
        ("JPEG", "CMYK", (60, 40)),
    ],
)
def test_every_valid_image_kind_becomes_the_model_input_training_saw(fmt: str, mode: str, size) -> None:
    data = encode(photo(3, size, "RGB" if mode == "I;16" else mode), fmt)
    if mode == "I;16":
        grey = (np.asarray(photo(3, size, "L"), dtype=np.uint16) * 257).astype(np.uint16)
        from PIL import Image

        data = encode(Image.fromarray(grey), fmt)
    decoded = decode_upload(data, LIMITS, PREP)
    training_side = batch_arrays([decode_rgb(data)], PREP)[0]
    assert decoded.array.shape == (3, SIZE, SIZE) and np.allclose(decoded.array, training_side)
    assert decoded.properties["width"] == size[0] and decoded.properties["file_bytes"] == len(data)


def test_serving_model_outputs_probabilities_and_projected_embeddings(bundles) -> None:
    model = ServingModel(bundles["1"])
    batch = np.stack([decode_upload(png(seed), LIMITS, PREP).array for seed in range(3)])
    outputs = model.infer(batch)
    assert outputs.proba.shape == (3, len(CLASSES)) and np.allclose(outputs.proba.sum(axis=1), 1, atol=1e-5)
    assert outputs.projected.shape == (3, 3)
    single = model.infer(batch[:1])
    assert np.allclose(single.proba[0], outputs.proba[0], atol=1e-5), "batching changes answers"


def test_adaptive_batcher_groups_concurrent_requests_and_keeps_batches_under_the_latency_budget() -> None:
    calls: list[int] = []

    def run(batch: np.ndarray):
        calls.append(len(batch))
        import time

        time.sleep(0.002 * len(batch))  # 2 ms per image
        return Outputs(batch.reshape(len(batch), -1)[:, :2], batch.reshape(len(batch), -1)[:, :1])

    told: list[int] = []

    async def scenario() -> list[tuple[np.ndarray, np.ndarray]]:
        batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=20, on_batch=told.append)
        try:
            lone = await batcher.submit(np.full((3,), 7.0))
            assert calls == [1]  # an idle model takes a lone request at once
            crowd = await asyncio.gather(*(batcher.submit(np.full((3,), float(i))) for i in range(60)))
            return [lone, *crowd]
        finally:
            batcher.close()

    results = asyncio.run(scenario())
    assert [float(proba[0]) for proba, _ in results[1:]] == [float(i) for i in range(60)]  # each gets its own
    assert len(calls) < 30, calls  # concurrent requests share calls
    assert max(calls[2:]) <= 10, calls  # 20 ms budget / 2 ms per image once measured
    assert told == calls  # every model call's size is reported (the service's batch-size histogram)


def test_a_failed_model_call_fails_its_requests_not_the_batcher() -> None:
    state = {"fail": True}

    def run(batch: np.ndarray):
        if state.pop("fail", False):
            raise RuntimeError("model crashed")
        return Outputs(np.ones((len(batch), 2)), np.zeros((len(batch), 1)))

    async def scenario() -> None:
        told: list[int] = []
        batcher = AdaptiveBatcher(run, 8, 20, on_batch=told.append)
        with pytest.raises(RuntimeError, match="model crashed"):
            await batcher.submit(np.zeros(3))
        assert told == []  # a failed call answered nothing
        proba, _ = await batcher.submit(np.zeros(3))
        assert proba.tolist() == [1.0, 1.0] and told == [1]
        batcher.close()

    asyncio.run(scenario())


def test_a_failing_batch_observer_neither_withholds_answers_nor_stops_the_batcher() -> None:
    def run(batch: np.ndarray):
        return Outputs(np.ones((len(batch), 2)), np.zeros((len(batch), 1)))

    def broken(images: int) -> None:
        raise RuntimeError("metrics store gone")

    async def scenario() -> list[tuple[np.ndarray, np.ndarray]]:
        batcher = AdaptiveBatcher(run, 8, 20, on_batch=broken)
        try:
            first = await asyncio.wait_for(batcher.submit(np.zeros(3)), 5)
            rest = await asyncio.wait_for(asyncio.gather(*(batcher.submit(np.zeros(3)) for _ in range(5))), 5)
            return [first, *rest]
        finally:
            batcher.close()

    answers = asyncio.run(scenario())
    assert [proba.tolist() for proba, _ in answers] == [[1.0, 1.0]] * 6


def test_canary_share_is_honoured_and_sticky_per_client() -> None:
    buckets = [canary_bucket(f"client-{i}") for i in range(20000)]
    share = float(np.mean(np.asarray(buckets) < 0.1))
    assert 0.09 < share < 0.11
    # sticky on every host and in every process (no per-process salt, as Python's hash() has)
    assert canary_bucket("client-7") == pytest.approx(0.8228656698483974, abs=1e-15)


KEY_A, KEY_B, KEY_F = "a" * 32, "b" * 40, "f" * 33  # long enough: at least 32 characters


def test_api_keys_come_from_env_and_file_with_roles_and_are_checked_exactly(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY_F} feedback\n\n# a comment\n")
    table = key_table({"MLOPS_API_KEYS": f" {KEY_A} , {KEY_B}:predict+admin ,"}, str(keys_file))
    assert {key: sorted(entry.roles) for key, entry in table.items()} == {
        KEY_A: ["admin", "feedback", "predict"],  # no roles given: all three (backwards compatible)
        KEY_B: ["admin", "predict"],
        KEY_F: ["feedback"],
    }
    assert api_keys({"MLOPS_API_KEYS": KEY_A}) == {KEY_A}
    assert authenticate(f"Bearer {KEY_B}", table) == table[KEY_B] and key_matches(
        f"Bearer {KEY_F}", set(table)
    )
    for header in (None, "", KEY_B, "Bearer ", f"Bearer {KEY_B[:-1]}", f"Basic {KEY_B}", f"Bearer{KEY_B}"):
        assert authenticate(header, table) is None, header
    for header in (f"bearer {KEY_B}", f"BEARER  {KEY_B} ", f"Bearer\t{KEY_B}"):  # the scheme in any case
        assert authenticate(header, table) == table[KEY_B], header
    assert table[KEY_A].key_id == key_id(KEY_A) and len(key_id(KEY_A)) == 12 and KEY_A not in key_id(KEY_A)


@pytest.mark.parametrize(
    ("env", "line", "problem"),
    [
        ("short-secret-key", None, "MLOPS_API_KEYS entry 1: the API key is 16 characters long"),
        (f"{KEY_A},tiny:admin", None, "MLOPS_API_KEYS entry 2: the API key is 4 characters long"),
        (f"{KEY_A}:root", None, "unknown role(s) ['root']"),
        (None, "0123456789", "line 1: the API key is 10 characters long"),
        (None, f"{KEY_A} predict,sudo", "line 1: unknown role(s) ['sudo']"),
    ],
    ids=["short-env", "second-short", "bad-role", "short-file", "bad-file-role"],
)
def test_unusable_api_keys_are_refused_naming_the_problem_not_the_key(
    tmp_path: Path, env: str | None, line: str | None, problem: str
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{line}\n" if line else "")
    with pytest.raises(KeyConfigError) as caught:
        key_table({"MLOPS_API_KEYS": env or ""}, str(keys_file) if line else None)
    message = str(caught.value)
    assert problem in message
    for secret in ("short-secret-key", "tiny", "0123456789"):
        assert secret not in message


def test_loopback_hosts_and_the_fail_closed_start() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", "testclient"))
    refuse_open_endpoint("127.0.0.1", has_keys=False, hosts=[])
    refuse_open_endpoint("0.0.0.0", has_keys=True, hosts=["0.0.0.0"])
    with pytest.raises(KeyConfigError, match="no API key configured and the service listens on 0.0.0.0"):
        refuse_open_endpoint("127.0.0.1", has_keys=False, hosts=["0.0.0.0"])  # the socket wins
    with pytest.raises(KeyConfigError, match="10.1.2.3"):
        refuse_open_endpoint("10.1.2.3", has_keys=False, hosts=[])


def test_a_worker_reads_where_it_listens_from_the_socket_it_was_handed() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        assert listening_hosts(
            ["worker.py", "bentos.service:ImageClassifier", "--fd", str(sock.fileno())]
        ) == ["0.0.0.0"]
    assert listening_hosts(["pytest"]) == []


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def row(i: int | str) -> dict:
    return {"time": "2026-01-05T10:00:00.000+00:00", "request_id": str(i)}


def test_the_flusher_writes_full_batches_and_quiet_rows_after_flush_seconds(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    log = PredictionLog(storage, flush_rows=3, flush_seconds=3600)
    for i in range(2):
        log.add(PREDICTIONS_PREFIX, row(i))
    time.sleep(0.3)
    assert storage.list(PREDICTIONS_PREFIX) == []  # under flush_rows and flush_seconds: still buffered
    log.add(PREDICTIONS_PREFIX, row(2))
    assert wait_for(lambda: len(read_jsonl(storage, PREDICTIONS_PREFIX)) == 3)
    assert [r["request_id"] for r in read_jsonl(storage, PREDICTIONS_PREFIX)] == ["0", "1", "2"]
    quiet = PredictionLog(LocalStorage(tmp_path / "quiet"), flush_rows=100, flush_seconds=0.3)
    quiet.add(FEEDBACK_PREFIX, row("a"))
    assert wait_for(lambda: read_jsonl(quiet.storage, FEEDBACK_PREFIX) == [row("a")], 5)
    log.close(), quiet.close()


def test_a_batch_across_midnight_files_each_row_under_its_own_day(tmp_path: Path) -> None:
    import datetime as dt

    from ml.monitoring.logs import log_records

    storage = LocalStorage(tmp_path / "store")
    log = PredictionLog(storage, flush_rows=100, flush_seconds=3600)
    times = [
        "2026-01-05T23:59:58.000+00:00",
        "2026-01-06T00:00:03.000+00:00",
        "2026-01-06T00:00:04.000+00:00",
    ]
    for i, at in enumerate(times):
        log.add(FEEDBACK_PREFIX, {"time": at, "request_id": str(i)})
    assert log.write_pending()
    days = sorted({key.split("/")[-2] for key in storage.list(FEEDBACK_PREFIX)})
    assert days == ["2026-01-05", "2026-01-06"]
    after_midnight = log_records(
        storage,
        FEEDBACK_PREFIX,
        dt.datetime(2026, 1, 6, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 6, 1, tzinfo=dt.UTC),
    )
    assert [r["request_id"] for r in after_midnight] == ["1", "2"]  # the monitor's window finds both
    log.close()


def stalled_s3(listener) -> object:
    """S3 storage whose endpoint accepts connections and never answers (a hung server)."""
    from ml.storage import open_storage

    port = listener.getsockname()[1]
    return open_storage("s3://stalled-bucket", endpoint_url=f"http://127.0.0.1:{port}", timeout_seconds=1)


def test_adding_never_waits_for_storage_even_when_it_hangs(tmp_path: Path) -> None:
    import gc
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes connections; nobody reads or answers
    log = PredictionLog(stalled_s3(listener), flush_rows=5, flush_seconds=0.1)
    for i in range(5):
        log.add(PREDICTIONS_PREFIX, row(i))
    # the flusher took the first batch and is now stuck in its write (3 tries of a 1 s timeout)
    assert wait_for(lambda: log.in_flight() == (5, 0), 10)
    gc.disable()  # a long pause of this big test process here could outlast the hanging write
    try:
        accepted = [log.add(PREDICTIONS_PREFIX, row(i)) for i in range(5, 300)]
        unwritten, in_flight, still_hanging = log.pending()[0], log.in_flight(), log.write_failures == 0
    finally:
        gc.enable()
    # the batch stuck in its write still counts as not written: 5 in flight and 295 buffered
    assert all(accepted) and unwritten == 300 and in_flight == (5, 0)
    assert still_hanging  # every add returned while the write was still waiting on the hung server
    assert wait_for(lambda: log.write_failures >= 1, 30)  # the write timed out
    assert log.pending() == (300, 0)  # and kept its rows (in the buffer, or in the flusher's next try)
    listener.close()
    assert not log.close()  # still down at shutdown: nothing written, and it says so


def test_an_outage_keeps_rows_up_to_the_cap_and_counts_what_it_drops(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_text("not a folder: every write fails")  # a real fault: the storage root is unusable
    drops: list[tuple[str, int]] = []
    log = PredictionLog(
        LocalStorage(root),
        flush_rows=2,
        flush_seconds=0.1,
        max_buffer_rows=5,
        max_buffer_bytes=10,
        on_drop=lambda kind, count: drops.append((kind, count)),
    )
    kept = [log.add(PREDICTIONS_PREFIX, row(i)) for i in range(8)]
    assert log.add_blob("serving/images/2026-01-05/a", b"12345678") and not log.add_blob("x/b", b"123")
    assert kept == [True] * 5 + [False] * 3 and log.dropped_rows == 3 and log.dropped_blobs == 1
    assert drops == [("rows", 1)] * 3 + [("images", 1)]
    # the flusher tries and fails meanwhile; what it holds during a try still counts as not written
    assert wait_for(lambda: log.write_failures >= 2, 10) and log.pending() == (5, 1)
    root.unlink()  # storage is back
    assert wait_for(lambda: log.pending() == (0, 0), 10)  # written, not just taken by a write
    assert [r["request_id"] for r in read_jsonl(log.storage, PREDICTIONS_PREFIX)] == ["0", "1", "2", "3", "4"]
    assert log.storage.read_bytes("serving/images/2026-01-05/a") == b"12345678"
    assert log.close()


def deploy(tmp_path: Path, state: DeploymentState) -> None:
    """What release does: the state in storage, where every replica reads it."""
    write_state(LocalStorage(tmp_path / "store"), state)


def predictor(bundles, tmp_path: Path, state: DeploymentState | None, **options) -> Predictor:
    storage = LocalStorage(tmp_path / "store")
    if state:
        write_state(storage, state)
    log = PredictionLog(storage, flush_rows=1000)
    found = Predictor(lambda v: bundles[v], LIMITS, state_storage=storage, prediction_log=log, **options)
    found.refresh()
    return found


def test_predictor_answers_logs_and_hot_swaps_on_a_new_state(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))

    async def scenario() -> list[dict]:
        answers = [await found.predict(png(seed)) for seed in range(4)]
        deploy(tmp_path, DeploymentState(stable="2", previous="1", revision=2))
        assert found.refresh()
        answers.append(await found.predict(png(0)))
        return answers

    answers = asyncio.run(scenario())
    assert {a["model_version"] for a in answers[:4]} == {"1"} and answers[4]["model_version"] == "2"
    assert set(answers[0]["probabilities"]) == set(CLASSES) and answers[0]["predicted_class"] in CLASSES
    found.close()
    rows = read_jsonl(found.prediction_log.storage, PREDICTIONS_PREFIX)
    assert len(rows) == 5 and {"brightness", "blur", "embedding_pc0", "confidence", "track"} <= set(rows[0])
    assert rows[0]["request_id"] == answers[0]["request_id"]


def test_predictor_keeps_serving_when_a_new_state_cannot_load(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))
    deploy(tmp_path, DeploymentState(stable="9", revision=2))
    assert not found.refresh()
    assert found.stable is not None and found.stable.version == "1" and "KeyError" in found.load_error
    assert asyncio.run(found.predict(png(1)))["model_version"] == "1"


def test_a_worker_starting_on_a_state_it_cannot_load_serves_the_last_version_that_loads(
    bundles, tmp_path: Path
) -> None:
    """Deploy v9 failed to load everywhere; a worker (re)starting now must not come up serving nothing."""
    state = DeploymentState(stable="9", previous="2", history=["1", "2", "9"])
    found = predictor(bundles, tmp_path, state)
    assert found.stable is not None and found.stable.version == "2" and "KeyError" in found.load_error
    assert asyncio.run(found.predict(png(1)))["model_version"] == "2"


def test_a_state_that_failed_to_load_is_tried_again_after_a_backoff(bundles, tmp_path: Path) -> None:
    available = dict(bundles)
    storage = LocalStorage(tmp_path / "store")
    write_state(storage, DeploymentState(stable="1"))
    found = Predictor(lambda v: available[v], LIMITS, state_storage=storage)
    found.refresh()
    deploy(tmp_path, DeploymentState(stable="3", previous="1", revision=2))  # v3's bundle is not there yet
    assert not found.refresh() and "KeyError" in found.load_error
    available["3"] = bundles["2"]  # the bundle arrives (an upload finished, storage came back)
    assert not found.refresh()  # not on every poll: after a backoff
    time.sleep(2.1)
    assert found.refresh() and found.state.stable == "3" and found.load_error == ""


@pytest.mark.parametrize(
    ("state", "served"),
    [
        (DeploymentState(stable="1", canary="9", canary_share=0.1, previous="2", history=["2", "1"]), "1"),
        (DeploymentState(stable="9", previous="2", history=["1", "2", "9"], reason="rollback: bad v2"), "1"),
    ],
    ids=["only-the-canary-fails", "the-rollback-target-fails"],
)
def test_a_worker_starting_on_a_state_it_cannot_load_serves_what_the_state_still_allows(
    bundles, tmp_path: Path, state: DeploymentState, served: str
) -> None:
    """Its stable model alone when only the canary fails; never the model a rollback removed."""
    found = predictor(bundles, tmp_path, state)
    assert found.stable is not None and found.stable.version == served and "KeyError" in found.load_error


def test_a_request_the_model_fails_is_logged_as_a_5xx_of_its_version(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))
    found.stable.model.session = None  # the ONNX session is gone: every model call raises

    with pytest.raises(AttributeError):
        asyncio.run(found.predict(png(1)))
    found.close()
    (row,) = read_jsonl(found.prediction_log.storage, PREDICTIONS_PREFIX)
    assert (row["model_version"], row["status"], row["error"]) == ("1", 500, "AttributeError")
    assert "predicted_class" not in row


def test_canary_routing_sends_its_share_to_the_challenger(bundles, tmp_path: Path) -> None:
    state = DeploymentState(stable="1", canary="2", canary_share=0.1)
    found = predictor(bundles, tmp_path, state)
    tracks = [found.route(f"client-{i}")[1] for i in range(2000)]
    assert 0.07 < tracks.count("canary") / len(tracks) < 0.13
    anonymous = [found.route(None)[1] for _ in range(2000)]  # no client id: each request drawn at random
    assert 0.07 < anonymous.count("canary") / len(anonymous) < 0.13
    found.canary_share = 0.0
    assert {found.route(None)[1] for _ in range(200)} == {"stable"}


def test_same_image_same_answer(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))
    first, second = (asyncio.run(found.predict(png(5))) for _ in range(2))
    assert first["probabilities"] == second["probabilities"] and first["request_id"] != second["request_id"]


def test_feedback_needs_a_known_label_and_a_plausible_request_id(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))
    request_id = asyncio.run(found.predict(png(1)))["request_id"]
    for bad_id, label in ((request_id, "cars"), ("", "toys"), ("../../etc", "toys"), ("x" * 129, "toys")):
        with pytest.raises(BadRequest) as caught:
            found.feedback(bad_id, label, CLASSES)
        assert caught.value.status == 400
    assert found.feedback(request_id, "toys", CLASSES)["status"] == "recorded"


def test_feedback_is_bound_to_the_key_that_made_the_prediction_and_given_once(
    bundles, tmp_path: Path
) -> None:
    shared = RequestIds(b"s" * 32)
    storage = LocalStorage(tmp_path / "store")

    def worker() -> Predictor:  # two workers (or replicas): one secret, one storage
        log = PredictionLog(storage, flush_rows=1000)
        found = Predictor(
            lambda v: bundles[v], LIMITS, prediction_log=log, request_ids=shared, default_version="1"
        )
        found.refresh()
        return found

    first, second = worker(), worker()
    answer = asyncio.run(first.predict(png(2), key_id="alice0000001"))
    request_id = answer["request_id"]
    assert len(request_id) <= 128 and request_id.replace("-", "").isalnum()
    forged = request_id[:-1] + ("0" if request_id[-1] != "0" else "1")
    cases = [
        (forged, "alice0000001", 404, "unknown_request"),
        ("0" * 32 + "-31-alice0000001-" + "0" * 32, "alice0000001", 404, "unknown_request"),
        (request_id, "mallory00001", 403, "not_your_prediction"),
    ]
    for candidate, who, status, code in cases:
        with pytest.raises(BadRequest) as caught:
            second.feedback(candidate, "toys", CLASSES, key_id=who)
        assert (caught.value.status, caught.value.code) == (status, code)
    recorded = second.feedback(request_id, "toys", CLASSES, key_id="alice0000001")  # another worker: fine
    assert (recorded["model_version"], recorded["key_id"], recorded["bound"]) == ("1", "alice0000001", True)
    for again in (first, second):
        with pytest.raises(BadRequest) as caught:
            again.feedback(request_id, "books", CLASSES, key_id="alice0000001")
        assert (caught.value.status, caught.value.code) == (409, "already_labelled")
    first.close(), second.close()
    (feedback,) = read_jsonl(storage, FEEDBACK_PREFIX)
    assert feedback["request_id"] == request_id and feedback["label"] == "toys" and feedback["time"]
    assert {r["request_id"] for r in read_jsonl(storage, PREDICTIONS_PREFIX)} == {request_id}


def test_request_ids_verify_only_with_the_secret_that_made_them(tmp_path: Path) -> None:
    ids = RequestIds(b"k" * 32)
    request_id = ids.mint("12", "0123456789ab")
    assert ids.verify(request_id) == Bound(request_id.split("-")[0], "12", "0123456789ab")
    assert RequestIds(b"j" * 32).verify(request_id) is None and ids.verify("abc") is None
    with pytest.raises(SecretError):
        RequestIds(b"short")
    path = tmp_path / "serving" / "feedback.key"
    secret = load_secret(path, environ={})
    assert load_secret(path, environ={}) == secret and len(secret) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret(path, environ={"MLOPS_FEEDBACK_SECRET": "e" * 40}) == b"e" * 40


def test_not_ready_tells_the_client_what_to_do_and_keeps_the_reason_in_the_log(
    bundles, tmp_path: Path, caplog
) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="9"))  # a version that does not exist
    assert found.stable is None and "KeyError" in found.load_error and found.load_incident
    with pytest.raises(BadRequest) as caught:
        found.route("client")
    assert (caught.value.status, caught.value.code) == (503, "not_ready")
    assert "retry" in caught.value.message and "KeyError" not in caught.value.message
    assert str(tmp_path) not in caught.value.message
    assert any(found.load_incident in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)


def test_deployment_state_round_trips_through_storage_and_writes_atomically(tmp_path: Path) -> None:
    state = DeploymentState(stable="3", canary="4", canary_share=0.1, previous="2", updated_by="me")
    storage = LocalStorage(tmp_path / "s")
    assert read_state(storage) is None
    write_state(storage, state)
    assert (
        read_state(storage) == state and json.loads(storage.read_bytes("serving/state.json"))["canary"] == "4"
    )
    assert [p.name for p in (tmp_path / "s" / "serving").iterdir()] == ["state.json"]
    before, after = update_state(storage, lambda current: replace(current, canary=None, canary_share=0.0))
    assert before == state and (after.revision, after.history, after.canary) == (1, ["3"], None)


def test_requests_in_flight_during_a_swap_all_complete(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1"))

    async def scenario() -> list[dict]:
        early = [asyncio.create_task(found.predict(png(i % 5))) for i in range(40)]
        await asyncio.sleep(0.01)  # some are queued at the old model, some decoding
        deploy(tmp_path, DeploymentState(stable="2", revision=2))
        assert found.refresh()
        late = [asyncio.create_task(found.predict(png(1))) for _ in range(10)]
        return await asyncio.gather(*early, *late)

    answers = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert len(answers) == 50 and {a["model_version"] for a in answers[40:]} == {"2"}
    assert found.reap_retired(grace_seconds=0) == 1  # the old model is closed once idle


def test_concurrent_writers_lose_no_prediction_rows(tmp_path: Path) -> None:
    import threading

    storage = LocalStorage(tmp_path / "store")
    log = PredictionLog(storage, flush_rows=7, flush_seconds=3600)

    def write(worker: int) -> None:
        for i in range(300):
            log.add(PREDICTIONS_PREFIX, {"time": "2026-01-05T10:00:00", "request_id": f"{worker}-{i}"})

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.close()
    rows = read_jsonl(storage, PREDICTIONS_PREFIX)
    assert len(rows) == 1200 and len({row["request_id"] for row in rows}) == 1200


def test_a_replica_reports_what_it_serves_and_release_waits_for_every_live_one(
    bundles, tmp_path: Path
) -> None:
    """Two replicas (workers) follow the state in storage; release waits on their heartbeats."""
    from ml.config import load_settings
    from ml.release.deploy import follows, wait_replicas
    from ml.serving.predictor import ReplicaIdentity
    from ml.serving.replica import live_heartbeats

    storage = LocalStorage(tmp_path / "store")
    settings = load_settings(environ={})
    assert wait_replicas(settings, storage, DeploymentState(stable="1"), timeout=0.5) is None  # none runs
    first = DeploymentState(stable="1", revision=1)
    a = predictor(bundles, tmp_path, first, identity=ReplicaIdentity("host-a", 0, "http://a", "bento:1"))
    b = predictor(bundles, tmp_path, None, identity=ReplicaIdentity("host-b", 0, "http://b", "bento:1"))
    beats = {beat.replica: beat for beat in live_heartbeats(storage, 15)}
    assert {name: (beat.stable, beat.revision) for name, beat in beats.items()} == {
        "host-a": ("1", 1),
        "host-b": ("1", 1),
    }
    assert wait_replicas(settings, storage, first, timeout=1) == []
    second = DeploymentState(stable="2", canary=None, revision=2)
    deploy(tmp_path, second)
    assert a.refresh()  # a follows; b has not polled yet
    (lagging,) = wait_replicas(settings, storage, second, timeout=0.5)
    assert lagging.replica == "host-b" and lagging.stable == "1" and not follows(lagging, second)
    assert b.refresh() and wait_replicas(settings, storage, second, timeout=1) == []
    b.close()  # a replica that stops cleanly takes its heartbeat with it
    assert [beat.replica for beat in live_heartbeats(storage, 15)] == ["host-a"]
    a.close()
    assert live_heartbeats(storage, 15) == []


def test_replicas_that_stop_before_following_a_state_are_no_live_deploy(bundles, tmp_path: Path) -> None:
    import threading

    from ml.config import load_settings
    from ml.release.deploy import require_live, wait_replicas
    from ml.serving.predictor import ReplicaIdentity

    storage = LocalStorage(tmp_path / "store")
    settings = load_settings(environ={"MLOPS__SERVING__SWITCH_TIMEOUT_SECONDS": "1.5"})
    first = DeploymentState(stable="1", revision=1)
    replicas = [
        predictor(bundles, tmp_path, first, identity=ReplicaIdentity(f"host-{n}", 0, f"http://{n}", "b:1"))
        for n in "ab"
    ]
    second = DeploymentState(stable="2", revision=2)
    deploy(tmp_path, second)  # neither polls it: both crash first, and their heartbeats go
    stopping = threading.Timer(0.4, lambda: [replica.close() for replica in replicas])
    stopping.start()
    assert wait_replicas(settings, storage, second) is None  # seen lagging, then gone: none serves it
    assert require_live(settings, storage, second, "deploy") is None  # not "live"
    stopping.join()


def test_a_replica_fetches_a_bundle_it_does_not_have_from_storage(bundles, tmp_path: Path) -> None:
    from ml.serving.bundle import fetch_bundle, publish_bundle

    storage = LocalStorage(tmp_path / "store")
    assert publish_bundle(storage, "product-classifier:v1-abc", bundles["1"])
    assert not publish_bundle(storage, "product-classifier:v1-abc", bundles["1"])  # already there
    folder = fetch_bundle(storage, "product-classifier:v1-abc", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "v1-abc"
    assert (folder / "model.onnx").read_bytes() == (bundles["1"] / "model.onnx").read_bytes()
    assert ServingModel(folder).version == "1"
    assert fetch_bundle(storage, "product-classifier:v1-abc", tmp_path / "cache") == folder  # cached


def test_a_shadow_sees_a_copy_of_traffic_and_its_answers_are_only_logged(bundles, tmp_path: Path) -> None:
    found = predictor(bundles, tmp_path, DeploymentState(stable="1", shadow="2", revision=1))
    assert found.shadow is not None and found.shadow.version == "2"

    async def scenario() -> list[dict]:
        answers = [await found.predict(png(seed)) for seed in range(6)]
        while found._shadows:
            await asyncio.sleep(0.01)
        return answers

    answers = asyncio.run(scenario())
    assert {a["model_version"] for a in answers} == {"1"}  # clients only ever see the stable model
    found.close()
    shadow = read_jsonl(found.prediction_log.storage, "serving/shadow")
    assert sorted(r["request_id"] for r in shadow) == sorted(a["request_id"] for a in answers)
    assert {r["model_version"] for r in shadow} == {"2"} and {r["track"] for r in shadow} == {"shadow"}
    logged = read_jsonl(found.prediction_log.storage, PREDICTIONS_PREFIX)
    assert {r["model_version"] for r in logged} == {"1"}  # live metrics never count the shadow


def calibrated_copy(source: Path, target: Path, **calibration: float) -> Path:
    """The bundle at ``source`` with model validation's temperature and conformal threshold in its meta."""
    import shutil

    shutil.copytree(source, target)
    meta = replace(BundleMeta.read(source), **calibration)
    (target / "meta.json").write_text(json.dumps(meta.__dict__))
    return target


def test_a_calibrated_bundle_divides_the_logits_by_its_temperature(bundles, tmp_path: Path) -> None:
    folder = calibrated_copy(bundles["1"], tmp_path / "v1", temperature=3.0, conformal_threshold=0.5)
    batch = np.stack([decode_upload(png(seed), LIMITS, PREP).array for seed in range(4)])
    plain, calibrated = ServingModel(bundles["1"]).infer(batch).proba, ServingModel(folder).infer(batch).proba
    scaled = np.exp(np.log(plain) / 3.0)
    assert np.allclose(calibrated, scaled / scaled.sum(axis=1, keepdims=True), atol=1e-5)
    assert (calibrated.max(axis=1) < plain.max(axis=1)).all()  # less sure...
    assert (calibrated.argmax(axis=1) == plain.argmax(axis=1)).all()  # ...of the same answer


@pytest.mark.parametrize(("threshold", "abstains"), [(0.0, False), (0.95, True)])
def test_a_bundle_with_a_conformal_threshold_answers_its_prediction_set(
    bundles, tmp_path: Path, threshold: float, abstains: bool
) -> None:
    folder = calibrated_copy(bundles["1"], tmp_path / "v1", temperature=1.5, conformal_threshold=threshold)
    found = predictor({"1": folder}, tmp_path, DeploymentState(stable="1"))
    answer = asyncio.run(found.predict(png(3)))
    found.close()
    members = [name for name, p in answer["probabilities"].items() if p >= 1 - threshold]
    assert answer["prediction_set"][0] == answer["predicted_class"]
    assert sorted(answer["prediction_set"]) == sorted(set(members) | {answer["predicted_class"]})
    assert answer["abstain"] is abstains and answer["abstain"] == (len(answer["prediction_set"]) > 1)


def test_a_bundle_from_before_validation_serves_as_before(bundles, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(bundles["1"], folder)
    raw = json.loads((folder / "meta.json").read_text())
    for key in ("temperature", "conformal_threshold", "coverage"):
        raw.pop(key, None)
    (folder / "meta.json").write_text(json.dumps(raw))
    assert BundleMeta.read(folder).temperature is None
    found = predictor({"1": folder}, tmp_path, DeploymentState(stable="1"))
    answer = asyncio.run(found.predict(png(3)))
    found.close()
    assert set(answer) == {
        "predicted_class",
        "confidence",
        "probabilities",
        "model_version",
        "track",
        "request_id",
    }
    reference = ServingModel(bundles["1"]).infer(decode_upload(png(3), LIMITS, PREP).array[None]).proba[0]
    assert np.allclose(list(answer["probabilities"].values()), reference, atol=1e-6)
