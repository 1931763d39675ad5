from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from ml.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    UnsafeKeyError,
    WriteConflict,
    append_jsonl,
    io_map,
    open_storage,
    safe_key,
    update_json,
)


@pytest.mark.parametrize(
    "key", ["../x", "a/../../b", "/etc/passwd", "a\\b", "", "a//b", "c:/win", "a/\x00", "a\nb", "a/\x1fb"]
)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        safe_key(key)


def test_keys_with_any_printable_character_are_kept() -> None:
    for key in ("a/b c.jpg", "a/\x7f~!@#$%^&()[]{};',=+.png", "images/été-日本.jpg", "a/ b"):
        assert safe_key(key) == key


def test_local_roundtrip_list_and_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("a/b/c.bin", b"123")
    storage.write_bytes("a/d.bin", b"4")
    assert storage.read_bytes("a/b/c.bin") == b"123"
    assert storage.list("a") == ["a/b/c.bin", "a/d.bin"]
    assert storage.exists("a/d.bin") and not storage.exists("a/zz")
    storage.delete("a/d.bin")
    assert storage.list() == ["a/b/c.bin"]
    assert storage.url("a/b/c.bin") == (tmp_path / "a/b/c.bin").as_uri()
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes("missing")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes("k", b"old")

    with pytest.raises(TypeError):
        storage.write_bytes("k", object())  # type: ignore[arg-type]
    assert storage.read_bytes("k") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_open_storage_by_url(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    with pytest.raises(StorageError, match="unsupported storage root"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        open_storage("s3:///x")


def test_s3_storage_over_http(s3_endpoint: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/pre/fix", endpoint_url=s3_endpoint)
    storage.write_bytes("landing/2026-01-01/labels.csv", b"filename,label\n")
    storage.write_bytes("landing/2026-01-01/images/a.jpg", b"x")
    assert storage.list("landing") == ["landing/2026-01-01/images/a.jpg", "landing/2026-01-01/labels.csv"]
    assert storage.exists("landing/2026-01-01/labels.csv") and not storage.exists("nope")
    assert storage.url("k") == f"s3://{s3_bucket}/pre/fix/k"
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes("nope")
    local = Path(tempfile.mkdtemp())
    (local / "f").write_bytes(b"from a file")
    storage.upload(local / "f", "curated/f.jpg")
    assert storage.read_bytes("curated/f.jpg") == b"from a file"
    assert storage.download("curated/f.jpg", local / "g", link=True) == 11  # a download, as ever
    shutil.rmtree(local)


def test_listing_reports_sizes_and_downloads_stream_to_a_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.write_bytes("a/big.bin", b"x" * 3_000_000)
    storage.write_bytes("a/small.bin", b"y")
    assert [(i.key, i.size) for i in storage.list_objects("a")] == [
        ("a/big.bin", 3_000_000),
        ("a/small.bin", 1),
    ]
    assert storage.download("a/big.bin", tmp_path / "copy") == 3_000_000
    assert (tmp_path / "copy").read_bytes() == b"x" * 3_000_000


def test_a_linked_download_is_a_snapshot_and_an_upload_links_on_one_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.write_bytes("landing/a.jpg", b"first")
    landed = storage.root / "landing/a.jpg"
    assert storage.download("landing/a.jpg", tmp_path / "linked", link=True) == 5
    assert os.stat(tmp_path / "linked").st_ino == os.stat(landed).st_ino
    assert storage.download("landing/a.jpg", tmp_path / "copied") == 5
    assert os.stat(tmp_path / "copied").st_ino != os.stat(landed).st_ino
    storage.write_bytes("landing/a.jpg", b"second")  # objects are replaced, never rewritten in place
    assert (tmp_path / "linked").read_bytes() == b"first" and storage.read_bytes("landing/a.jpg") == b"second"

    own = tmp_path / "own"
    own.write_bytes(b"curated")
    storage.upload(own, "curated/x.jpg")
    storage.upload(own, "curated/x.jpg")  # again: replaced, not refused
    assert storage.read_bytes("curated/x.jpg") == b"curated"
    assert os.stat(storage.root / "curated/x.jpg").st_ino == os.stat(own).st_ino
    assert [p.name for p in (storage.root / "curated").iterdir()] == ["x.jpg"]  # no temporary left
    newer = tmp_path / "newer"
    newer.write_bytes(b"recurated")
    storage.upload(newer, "curated/x.jpg")  # another file onto a key: it replaces the object
    assert storage.read_bytes("curated/x.jpg") == b"recurated" and own.read_bytes() == b"curated"
    storage.upload(own, "curated/deep/new/folder/z.jpg")  # a folder not there yet is made
    assert os.stat(storage.root / "curated/deep/new/folder/z.jpg").st_ino == os.stat(own).st_ino
    with pytest.raises(FileNotFoundError):
        storage.upload(tmp_path / "missing", "curated/m.jpg")
    assert not storage.exists("curated/m.jpg")
    with monkeypatch.context() as patched:  # a new key takes one link: no temporary renamed into place
        patched.setattr(os, "replace", lambda *_: pytest.fail("a new key was renamed into place"))
        storage.upload(own, "curated/new.jpg")
    assert os.stat(storage.root / "curated/new.jpg").st_ino == os.stat(own).st_ino

    other = Path(tempfile.mkdtemp(dir="/dev/shm"))  # another filesystem: no link can be made
    try:
        (other / "f").write_bytes(b"elsewhere")
        assert os.stat(other).st_dev != os.stat(storage.root).st_dev
        storage.upload(other / "f", "curated/y.jpg")
        assert storage.read_bytes("curated/y.jpg") == b"elsewhere"
        assert os.stat(storage.root / "curated/y.jpg").st_ino != os.stat(other / "f").st_ino
        assert storage.download("curated/y.jpg", other / "g", link=True) == 9  # falls back to a copy
        assert (other / "g").read_bytes() == b"elsewhere"
    finally:
        shutil.rmtree(other)


def test_write_if_is_compare_and_swap(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.write_if("state.json", b"1", None)  # created
    assert not storage.write_if("state.json", b"2", None)  # exists already
    data, tag = storage.read_tagged("state.json")
    assert data == b"1" and storage.write_if("state.json", b"2", tag)
    assert not storage.write_if("state.json", b"3", tag)  # the tag is stale now
    assert storage.read_bytes("state.json") == b"2" and storage.read_tagged("missing") is None
    assert storage.list() == ["state.json"]  # the lock file is not an object


def _increment_many(root: str, times: int) -> None:
    storage = LocalStorage(Path(root))
    for _ in range(times):
        update_json(storage, "counter.json", lambda value: {"n": (value or {"n": 0})["n"] + 1}, attempts=1000)


def test_two_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    """Two processes increment one counter through update_json: every increment survives."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_increment_many, args=(str(tmp_path), 200)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert json.loads(LocalStorage(tmp_path).read_bytes("counter.json")) == {"n": 400}


def _append_many(root: str, writer: int, times: int) -> None:
    storage = LocalStorage(Path(root))
    for i in range(times):
        append_jsonl(storage, "log.jsonl", {"writer": writer, "i": i}, attempts=1000)


def test_two_concurrent_appenders_lose_no_line(tmp_path: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), w, 100)) for w in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    lines = [json.loads(line) for line in LocalStorage(tmp_path).read_bytes("log.jsonl").splitlines()]
    assert sorted((r["writer"], r["i"]) for r in lines) == [(w, i) for w in range(2) for i in range(100)]


def test_a_writer_that_always_loses_gets_a_clear_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)

    def meddle(value):  # another writer changes the document between every read and write
        storage.write_bytes("doc.json", json.dumps({"other": os.urandom(4).hex()}).encode())
        return {"mine": True}

    with pytest.raises(WriteConflict, match="other writers changed it 3 times"):
        update_json(storage, "doc.json", meddle, attempts=3)


def test_s3_conditional_writes_raw_keys_and_encryption(s3_endpoint: str, s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    storage = open_storage(
        f"s3://{s3_bucket}/root", endpoint_url=s3_endpoint, encryption={"ServerSideEncryption": "AES256"}
    )
    assert storage.write_if("state.json", b"1", None) and not storage.write_if("state.json", b"x", None)
    data, tag = storage.read_tagged("state.json")
    assert storage.write_if("state.json", b"2", tag) and not storage.write_if("state.json", b"3", tag)
    assert storage.read_bytes("state.json") == b"2"
    head = client.head_object(Bucket=s3_bucket, Key="root/state.json")
    assert head["ServerSideEncryption"] == "AES256"  # asked for on every PUT, conditional ones too
    client.put_object(Bucket=s3_bucket, Key="root/d/images/", Body=b"")  # a console folder marker
    client.put_object(Bucket=s3_bucket, Key="root/d/images//twice.jpg", Body=b"abc")
    listed = {info.key: info for info in storage.list_objects("d")}
    assert listed["d/images/"].is_folder_marker and listed["d/images//twice.jpg"].size == 3
    assert storage.read_unchecked("d/images//twice.jpg") == b"abc"
    assert storage.download("state.json", Path(tempfile.mkdtemp()) / "s") == 1


def test_copy_moves_no_bytes_through_memory_and_keeps_encryption(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    """Local copies are atomic files; S3 copies are server-side (CopyObject) and carry the SSE setting."""
    import boto3

    local = LocalStorage(tmp_path)
    local.write_bytes("a/one.bin", b"x" * 3000)
    local.copy("a/one.bin", "b/two.bin")
    assert local.read_bytes("b/two.bin") == b"x" * 3000 and local.exists("a/one.bin")
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(StorageError):
        local.copy("a/missing.bin", "b/three.bin")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3 = S3Storage(client, s3_bucket, "root", encryption={"ServerSideEncryption": "AES256"})
    s3.write_bytes("a/one.bin", b"y" * 3000)
    s3.copy("a/one.bin", "b/two.bin")
    assert s3.read_bytes("b/two.bin") == b"y" * 3000
    head = client.head_object(Bucket=s3_bucket, Key="root/b/two.bin")
    assert head["ServerSideEncryption"] == "AES256"
    with pytest.raises(StorageError):
        s3.copy("a/missing.bin", "b/three.bin")


def test_s3_copies_take_one_request_and_deletes_go_a_thousand_keys_per_request(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    """What a large day's publish and staging cleanup cost in requests (counted as they are sent)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3 = S3Storage(client, s3_bucket, "root")
    keys = [f"staging/{i:04d}.bin" for i in range(1203)]
    for key in keys[:3]:
        s3.write_bytes(key, key.encode())
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    s3.copy(keys[0], "curated/a.bin")
    assert sent == ["PUT"] and s3.read_bytes("curated/a.bin") == keys[0].encode()  # no HEAD before it
    sent.clear()
    s3.delete_many(keys)  # three written, 1200 never were: S3 deletes are idempotent
    assert sent == ["POST", "POST"] and s3.list("staging") == []
    local = LocalStorage(tmp_path)
    local.write_bytes("s/1", b"1")
    local.delete_many(["s/1", "s/2"])
    assert local.list("s") == []


class RecordedWrites:
    """Writes key ``k/NN`` per call (the thirteenth fails), noting the threads that ran the calls and the
    most in flight at once; with ``together`` the first four calls wait for each other."""

    def __init__(self, storage: Storage, together: threading.Barrier | None = None) -> None:
        self.storage, self.together = storage, together
        self.lock, self.threads, self.active, self.peak = threading.Lock(), set(), 0, 0

    def __call__(self, index: int) -> int:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.threads.add(threading.get_ident())
        try:
            if self.together is not None and index < 4:
                self.together.wait()
            if index == 13:
                raise StorageError("the thirteenth write fails")
            self.storage.write_bytes(f"k/{index:02d}", b"x")
            return index
        finally:
            with self.lock:
                self.active -= 1


def run_writes(writes: RecordedWrites) -> None:
    assert list(io_map(writes.storage, writes, range(12), 4)) == list(range(12))  # results in order
    with pytest.raises(StorageError, match="thirteenth"):
        for _ in io_map(writes.storage, writes, range(12, 20), 4):
            pass
    assert writes.active == 0  # raised once the calls in flight had ended


def test_io_map_calls_a_local_store_in_this_thread_and_s3_on_threads_in_order(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    local = RecordedWrites(LocalStorage(tmp_path))
    run_writes(local)  # io_threads 1: no thread hand-offs, and nothing after the failure ran
    assert local.threads == {threading.get_ident()} and local.peak == 1
    assert local.storage.list("k") == [f"k/{i:02d}" for i in range(13)]
    s3 = RecordedWrites(
        open_storage(f"s3://{s3_bucket}/io", endpoint_url=s3_endpoint), threading.Barrier(4, timeout=10)
    )
    run_writes(s3)  # io_threads 16, at most 4 asked for: four in flight at once, never more
    assert threading.get_ident() not in s3.threads and s3.peak == 4
    assert {f"k/{i:02d}" for i in range(13)} <= set(s3.storage.list("k"))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_listed_tag_changes_when_the_object_is_written_again_and_only_then(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        storage = LocalStorage(tmp_path)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        storage = open_storage(f"s3://{bucket}/p", endpoint_url=request.getfixturevalue("s3_endpoint"))

    def tag() -> str:
        return {info.key: info.tag for info in storage.list_objects("catalog")}["catalog/a.parquet"]

    storage.write_bytes("catalog/a.parquet", b"first bytes")
    first = tag()
    storage.read_bytes("catalog/a.parquet")
    storage.write_bytes("catalog/other", b"x")
    assert first and tag() == first
    storage.write_bytes("catalog/a.parquet", b"other bytes")  # the same size, at once
    assert tag() != first
