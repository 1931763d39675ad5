from __future__ import annotations

from pathlib import Path

import pytest

from ml.storage import LocalStorage, StorageError, UnsafeKeyError, open_storage, safe_key


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a\\b", "", "a//b", "c:/win", "a/\x00"])
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        safe_key(key)


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
