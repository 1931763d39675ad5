"""URL-addressed object storage: ``s3://bucket/prefix`` or ``file:///path``, one interface.

Keys are relative, ``/``-separated paths under the root. Every write is atomic: a local write
goes to a temporary file that is renamed into place, and an S3 PUT is atomic by itself, so a
killed task never leaves a half-written object behind.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from ml.config import REPO_ROOT, Settings


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL."""


class UnsafeKeyError(ValueError):
    """A key would escape its folder (``..``, absolute path, backslash, control characters)."""


def safe_key(key: str) -> str:
    """Return ``key`` normalised, or raise if it could escape the storage root."""
    if not key or "\x00" in key or "\\" in key or any(ord(c) < 32 for c in key):
        raise UnsafeKeyError(f"unsafe key {key!r}: empty or contains control characters/backslash")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise UnsafeKeyError(f"unsafe key {key!r}: absolute path")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeKeyError(f"unsafe key {key!r}: empty, '.' or '..' path segment")
    return posixpath.join(*parts)


def join_key(*parts: str) -> str:
    return safe_key("/".join(part.strip("/") for part in parts if part))


class Storage(Protocol):
    root_url: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...


class LocalStorage:
    """Storage in a local folder; ``file://`` URLs."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root_url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / safe_key(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = [
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".tmp-")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.root_url


class S3Storage:
    """Storage under ``s3://bucket/prefix`` through a boto3 S3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root_url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _object_key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise StorageError(f"not found: {self.url(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._object_key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                name = item["Key"]
                yield name[len(self.prefix) + 1 :] if self.prefix else name

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter_keys(prefix))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def url(self, key: str) -> str:
        return f"{self.root_url}/{key}" if key else self.root_url


def read_jsonl(storage: Storage, prefix: str, days: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a day-partitioned JSONL log (``prefix/DAY/*.jsonl``), optionally some days only."""
    records = []
    for key in storage.list(prefix):
        if days is not None and key.removeprefix(prefix + "/")[:10] not in days:
            continue
        records.extend(json.loads(line) for line in storage.read_bytes(key).decode().splitlines() if line)
    return records


def resolve_local_root(root: str) -> Path:
    """A ``file://`` URL or a path; relative paths are taken from the repository root."""
    if root.startswith("file://"):
        return Path(unquote(urlparse(root).path))
    path = Path(root).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the default credential chain (used outside Airflow)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint_url)


def open_storage(root: str, *, s3_client_factory: Any = None, endpoint_url: str | None = None) -> Storage:
    """Open the storage at ``root``. ``s3_client_factory()`` supplies the client for ``s3://``."""
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage root {root!r} names no bucket")
        client = s3_client_factory() if s3_client_factory else s3_client(endpoint_url)
        return S3Storage(client, parsed.netloc, parsed.path)
    if parsed.scheme in ("", "file"):
        return LocalStorage(resolve_local_root(root))
    raise StorageError(f"unsupported storage root {root!r}: use s3://bucket/prefix or file:///path")


def storage_from_settings(settings: Settings) -> Storage:
    """Storage for the CLI and tests: S3 credentials from the default chain, endpoint from config."""
    return open_storage(settings.storage.root, endpoint_url=settings.storage.endpoint_url)
