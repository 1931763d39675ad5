"""URL-addressed object storage: ``s3://bucket/prefix`` or ``file:///path``, one interface.

Keys are relative, ``/``-separated paths under the root. Every write is atomic: a local write
goes to a temporary file that is renamed into place, and an S3 PUT is atomic by itself, so a
killed task never leaves a half-written object behind. Shared documents (state files) are
updated compare-and-swap: ``read_tagged`` returns a tag, ``write_if`` writes only while the tag
still holds (a file lock locally; a conditional ``If-Match`` / ``If-None-Match`` PUT on S3), and
``update_json`` retries a read-modify-write until it wins. Listing returns the keys exactly as
the bucket holds them, with their sizes, so callers can refuse what they should not read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, unquote, urlparse

from ml.config import REPO_ROOT, Settings

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL."""


class UnreadableObject(StorageError):
    """An object is listed but this caller cannot read it, and retrying will not change that: access
    denied, or archived (S3 Glacier and Deep Archive until restored). ``code`` is S3's error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# S3's answers for one object that is there but not readable by this caller as it is
UNREADABLE_CODES = {
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidObjectState": "archived: restore it first",
    "ObjectNotInActiveTierError": "archived: restore it first",
}


class WriteConflict(StorageError):
    """Another writer changed a shared document first (compare-and-swap lost every attempt)."""


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object: its key as stored (not yet checked for safety), its size in bytes, and a tag that
    changes whenever the object is written again ('' where the listing gave none)."""

    key: str
    size: int
    tag: str = ""

    @property
    def is_folder_marker(self) -> bool:
        """The empty ``folder/`` object the S3 console and many sync tools create."""
        return self.key.endswith("/") and self.size == 0


CHUNK_BYTES = 1 << 20  # streamed downloads move this much at a time
DELETE_BATCH = 1000  # keys per DeleteObjects request (the S3 API's limit)


class UnsafeKeyError(ValueError):
    """A key would escape its folder (``..``, absolute path, backslash, control characters)."""


UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\\]")  # control characters and the backslash


def safe_key(key: str) -> str:
    """Return ``key`` normalised, or raise if it could escape the storage root."""
    if not key or UNSAFE_CHARACTERS.search(key):
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
    io_threads: int  # requests worth having in flight at once

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def list_objects(self, prefix: str = "") -> list[ObjectInfo]: ...
    def download(self, key: str, path: Path, *, link: bool = False) -> int: ...
    def upload(self, path: Path, key: str) -> None: ...
    def read_tagged(self, key: str) -> tuple[bytes, str] | None: ...
    def write_if(self, key: str, data: bytes, tag: str | None) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: Sequence[str]) -> None: ...
    def copy(self, source: str, target: str) -> None: ...
    def url(self, key: str) -> str: ...


Item = TypeVar("Item")
Result = TypeVar("Result")


def io_map(
    storage: Storage, fn: Callable[[Item], Result], items: Iterable[Item], most: int
) -> Iterator[Result]:
    """``fn`` over ``items``, results in order: up to ``most`` at a time on threads where ``storage``
    gains from them (its ``io_threads``), else one by one in this thread (a thread pool's hand-off per
    item cost a local store ~0.1 ms per object, more than its file operations). A failure is raised
    once the calls in flight have ended."""
    threads = min(most, storage.io_threads)
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="io") as pool:
        yield from pool.map(fn, items)


def content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_info(key: str, stat: os.stat_result) -> ObjectInfo:
    # Every write renames a new file into place: a new inode (the old file still held its own), and
    # a new modification time to the nanosecond where the filesystem keeps one.
    return ObjectInfo(key, stat.st_size, f"{stat.st_ino:x}-{stat.st_size:x}-{stat.st_mtime_ns:x}")


class LocalStorage:
    """Storage in a local folder; ``file://`` URLs."""

    # Nothing waits on a network: threads only contend for the GIL and the folder (measured: 16
    # threads spent ~2x the CPU per 30 KB file copy of one thread, for no gain in wall time).
    io_threads = 1

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

    def copy(self, source: str, target: str) -> None:
        """``source`` to ``target`` (atomically, as a write), without holding the object in memory."""
        origin, destination = self._path(source), self._path(target)
        if not origin.is_file():
            raise StorageError(f"not found: {self.url(source)}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=destination.parent)
        os.close(fd)
        try:
            shutil.copyfile(origin, tmp)
            os.replace(tmp, destination)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_objects(prefix)]

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / safe_key(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        found = [
            _local_info(path.relative_to(self.root).as_posix(), path.stat())
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith((".tmp-", ".lock-"))
        ]
        return sorted(found, key=lambda info: info.key)

    def upload(self, path: Path, key: str) -> None:
        """A local file's bytes to ``key`` (atomically, as a write). The file must be the caller's own
        copy, never written again: on the same filesystem the object becomes a hard link to it (no
        bytes copied), elsewhere a copy."""
        target = self._path(key)
        with contextlib.suppress(OSError):  # a new key on this filesystem: one atomic link, no temporary
            os.link(path, target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            os.link(path, tmp)
        except OSError:  # another filesystem, or links not allowed here
            shutil.copyfile(path, tmp)
        try:
            os.replace(tmp, target)
        finally:  # a rename onto another link of the same file does nothing and leaves the temporary
            tmp.unlink(missing_ok=True)

    def download(self, key: str, path: Path, *, link: bool = False) -> int:
        """The object's bytes to a new file ``path``; with ``link`` (for a caller that only reads the
        file) a hard link to the object where the filesystem allows: a snapshot, as objects here are
        replaced, never rewritten in place."""
        try:
            if link:
                with contextlib.suppress(OSError):
                    os.link(self._path(key), path)
                    return path.stat().st_size
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None
        except PermissionError:
            raise UnreadableObject(f"AccessDenied (access denied): {self.url(key)}", "AccessDenied") from None
        return path.stat().st_size

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".lock-{target.name}"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, content_tag(data)

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Write ``data`` if the object still has ``tag`` (None: only if it does not exist)."""
        with self._locked(key):
            current = self.read_tagged(key)
            if (current[1] if current else None) != tag:
                return False
            self.write_bytes(key, data)
            return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.delete(key)

    def url(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.root_url


def _s3_tag(item: dict[str, Any]) -> str:
    # An ETag is no content hash under SSE-KMS or multipart upload; with the time it changes on
    # every write.
    if "ETag" not in item or "LastModified" not in item:
        return ""
    return f"{item['ETag']}@{item['LastModified'].isoformat()}"


class S3Storage:
    """Storage under ``s3://bucket/prefix`` through a boto3 S3 client."""

    io_threads = 16  # each request mostly waits on the network

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", encryption: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root_url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.encryption = dict(encryption or {})  # ServerSideEncryption (+ SSEKMSKeyId) on every PUT

    def _object_key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _raw_key(self, key: str) -> str:
        """A listed key as the bucket holds it (possibly unsafe as a path), under the prefix."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise StorageError(f"not found: {self.url(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data, **self.encryption)

    def copy(self, source: str, target: str) -> None:
        """A server-side copy (multipart for large objects): the bytes never pass through this host."""
        origin = {"Bucket": self.bucket, "Key": self._object_key(source)}
        target_key = self._object_key(target)
        try:
            # One CopyObject request; the managed copy (a HEAD first, multipart) only past its 5 GB limit.
            self.client.copy_object(CopySource=origin, Bucket=self.bucket, Key=target_key, **self.encryption)
        except self.client.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"not found: {self.url(source)}") from None
            if error.get("Code") in UNREADABLE_CODES:
                raise self._unreadable(exc, source) from None
            too_large = "copy source is larger" in error.get("Message", "")
            if error.get("Code") != "InvalidRequest" or not too_large:
                raise
            self.client.copy(origin, self.bucket, target_key, ExtraArgs=self.encryption or None)

    def read_unchecked(self, key: str) -> bytes:
        """An object whose listed key is not a safe path (kept only to quarantine it)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._raw_key(key))["Body"].read()
        except self.client.exceptions.ClientError as exc:
            raise self._unreadable(exc, key) from None

    def _unreadable(self, exc: Exception, key: str) -> Exception:
        """``UnreadableObject`` for an error that retrying cannot mend, else ``exc`` itself."""
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code not in UNREADABLE_CODES:
            return exc
        return UnreadableObject(f"{code} ({UNREADABLE_CODES[code]}): {self.url(key)}", code)

    def upload(self, path: Path, key: str) -> None:
        """A local file's bytes to ``key``: one PUT streamed from the file."""
        with path.open("rb") as body:
            self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=body, **self.encryption
            )

    def download(self, key: str, path: Path, *, link: bool = False) -> int:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise StorageError(f"not found: {self.url(key)}") from None
        except self.client.exceptions.ClientError as exc:
            raise self._unreadable(exc, key) from None
        size = 0
        with path.open("wb") as out:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                out.write(chunk)
                size += len(chunk)
        return size

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return found["Body"].read(), str(found["ETag"])

    def write_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """A conditional PUT: ``If-Match`` the tag, or ``If-None-Match: *`` when creating."""
        condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=data, **condition, **self.encryption
            )
        except self.client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._object_key(prefix) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                name = item["Key"]
                key = name[len(self.prefix) + 1 :] if self.prefix else name
                yield ObjectInfo(key, int(item["Size"]), _s3_tag(item))

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        return sorted(self._iter_objects(prefix), key=lambda info: info.key)

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_objects(prefix)]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete in batches of ``DELETE_BATCH`` keys per request (S3's DeleteObjects limit)."""
        names = [self._object_key(key) for key in keys]
        for start in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": name} for name in names[start : start + DELETE_BATCH]]
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):
                first, count = reply["Errors"][0], len(reply["Errors"])
                raise StorageError(
                    f"{count} object(s) not deleted, e.g. {first.get('Key')}: {first.get('Message')}"
                )

    def url(self, key: str) -> str:
        return f"{self.root_url}/{key}" if key else self.root_url


def read_jsonl(storage: Storage, prefix: str, days: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a day-partitioned JSONL log (``prefix/DAY/*.jsonl``), optionally some days only."""
    records = []
    keys = (
        storage.list(prefix)
        if days is None
        else [k for day in sorted(set(days)) for k in storage.list(f"{prefix}/{day}")]
    )
    for key in keys:
        records.extend(json.loads(line) for line in storage.read_bytes(key).decode().splitlines() if line)
    return records


def update_json(
    storage: Storage,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any]],
    attempts: int = 20,
) -> dict[str, Any]:
    """Read-modify-write a JSON document compare-and-swap; ``change`` gets the current value (or None).

    Raises ``WriteConflict`` when other writers won every attempt.
    """
    for _ in range(attempts):
        current = storage.read_tagged(key)
        value = change(json.loads(current[0]) if current else None)
        data = json.dumps(value, indent=2, sort_keys=True, default=str).encode()
        if storage.write_if(key, data, current[1] if current else None):
            return value
    raise WriteConflict(f"{storage.url(key)}: other writers changed it {attempts} times in a row")


def append_jsonl(storage: Storage, key: str, record: dict[str, Any], attempts: int = 20) -> None:
    """Append one record to a shared JSONL document, compare-and-swap (concurrent appends all land)."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    for _ in range(attempts):
        current = storage.read_tagged(key)
        body = current[0] if current else b""
        if body and not body.endswith(b"\n"):
            body += b"\n"
        if storage.write_if(key, body + line, current[1] if current else None):
            return
    raise WriteConflict(f"{storage.url(key)}: other writers changed it {attempts} times in a row")


def resolve_local_root(root: str) -> Path:
    """A ``file://`` URL or a path; relative paths are taken from the repository root."""
    if root.startswith("file://"):
        return Path(unquote(urlparse(root).path))
    path = Path(root).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def s3_client(endpoint_url: str | None = None, timeout_seconds: float = 30) -> Any:
    """A boto3 S3 client from the default credential chain (used outside Airflow), with timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=min(timeout_seconds, 10),
        read_timeout=timeout_seconds,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def encryption_args(settings: Settings) -> dict[str, str]:
    """The server-side encryption every S3 PUT asks for (``storage.server_side_encryption``)."""
    config = settings.storage
    if not config.server_side_encryption:
        return {}
    args = {"ServerSideEncryption": config.server_side_encryption}
    if config.kms_key_id:
        args["SSEKMSKeyId"] = config.kms_key_id
    return args


def open_storage(
    root: str,
    *,
    s3_client_factory: Any = None,
    endpoint_url: str | None = None,
    encryption: dict[str, str] | None = None,
    timeout_seconds: float = 30,
) -> Storage:
    """Open the storage at ``root``. ``s3_client_factory()`` supplies the client for ``s3://``."""
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage root {root!r} names no bucket")
        client = s3_client_factory() if s3_client_factory else s3_client(endpoint_url, timeout_seconds)
        return S3Storage(client, parsed.netloc, parsed.path, encryption)
    if parsed.scheme in ("", "file"):
        return LocalStorage(resolve_local_root(root))
    raise StorageError(f"unsupported storage root {root!r}: use s3://bucket/prefix or file:///path")


def storage_from_settings(settings: Settings) -> Storage:
    """Storage for the CLI and tests: S3 credentials from the default chain, endpoint from config."""
    return open_storage(
        settings.storage.root,
        endpoint_url=settings.storage.endpoint_url,
        encryption=encryption_args(settings),
        timeout_seconds=settings.storage.timeout_seconds,
    )


# -- links a person can open (alerts, the approval form); ``url()`` stays the machine address ------

REPORTS_PREFIX = "reports"  # the only folder of a local root the stack's report server shows


def reports_base_url(settings: Settings) -> str:
    """Where people open a local root's reports: ``reports.url``, else the stack's report server."""
    return (settings.reports.url or f"http://127.0.0.1:{settings.reports.port}").rstrip("/")


def _presign_with_sigv4(signature_version: str, **_: Any) -> str | None:
    """botocore ``choose-signer`` hook: presign with SigV4, not botocore's default SigV2 (retired by S3)."""
    return "s3v4-query" if signature_version == "v4-query" else None


def presigned_url(storage: S3Storage, key: str, expires_seconds: int) -> str:
    """A time-limited GET link to one object: the SigV4 signature in the query is the permission."""
    storage.client.meta.events.register_first(
        "choose-signer.s3.GetObject", _presign_with_sigv4, unique_id="ml.storage.presign-sigv4"
    )
    params = {"Bucket": storage.bucket, "Key": storage._object_key(key)}
    return str(storage.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_seconds))


def browsable_url(storage: Storage, key: str, settings: Settings, expires_seconds: int | None = None) -> str:
    """A link to ``key`` under ``reports/`` that Slack and a browser can open.

    S3: a presigned URL valid ``storage.link_expiry_seconds`` (or ``expires_seconds``, if shorter); a
    local root: the report server's URL. Any other key (images, the catalog: never handed out as a
    link), or a presign that fails, keeps ``url(key)``.
    """
    key = safe_key(key)
    if not key.startswith(f"{REPORTS_PREFIX}/"):
        return storage.url(key)
    if isinstance(storage, S3Storage):
        expiry = min(
            settings.storage.link_expiry_seconds, expires_seconds or settings.storage.link_expiry_seconds
        )
        try:
            return presigned_url(storage, key, expiry)
        except Exception as exc:  # noqa: BLE001 - a link is a courtesy: no credentials must not fail a step
            log.warning("could not presign %s: %s", storage.url(key), exc)
            return storage.url(key)
    return f"{reports_base_url(settings)}/{quote(key)}"


def browsable_link(storage: Storage, url: str, settings: Settings) -> str:
    """``url`` (a storage URL, e.g. named in an error message) as a link a person can open.

    URLs outside this storage root are returned unchanged."""
    prefix = storage.root_url + "/"
    if not url.startswith(prefix):
        return url
    key = url[len(prefix) :]
    try:
        return browsable_url(storage, unquote(key) if isinstance(storage, LocalStorage) else key, settings)
    except UnsafeKeyError:
        return url
