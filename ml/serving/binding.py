"""Request ids that bind feedback to its prediction, across worker processes and replicas.

A request id is ``<nonce>-<model version, hex>-<key id>-<mac>``: the MAC is an HMAC-SHA256 over
the other three with a secret every worker shares, so /feedback can tell an id this service
issued (and to which key, for which model) from a forged or mistyped one without any lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from ml.config import REPO_ROOT

SECRET_ENV = "MLOPS_FEEDBACK_SECRET"  # noqa: S105 - the variable's name; the secret comes from it
SECRET_FILE = "feedback.key"  # noqa: S105 - a file name in serving.state_dir (created once, mode 0600)
MIN_SECRET_BYTES = 32
MAC_HEX = 32
MAX_REQUEST_ID = 128


class SecretError(RuntimeError):
    """No usable request-id secret (too short, or the file cannot be created or read)."""


@dataclass(frozen=True)
class Bound:
    """What a verified request id says: which prediction, which model, which caller."""

    nonce: str
    model_version: str
    key_id: str


def well_formed(request_id: str) -> bool:
    """Within what /feedback accepts: at most 128 characters, ASCII letters, digits and '-'."""
    return (
        0 < len(request_id) <= MAX_REQUEST_ID
        and request_id.isascii()
        and request_id.replace("-", "").isalnum()
    )


class RequestIds:
    """Mints and verifies request ids with one shared secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"the request-id secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def _mac(self, nonce: str, version_hex: str, key_id: str) -> str:
        message = f"{nonce}-{version_hex}-{key_id}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:MAC_HEX]

    def mint(self, model_version: str, key_id: str) -> str:
        nonce, version_hex = uuid.uuid4().hex, model_version.encode().hex()
        request_id = f"{nonce}-{version_hex}-{key_id}-{self._mac(nonce, version_hex, key_id)}"
        if not well_formed(request_id):
            raise ValueError(f"model version {model_version!r} or key id makes a request id too long")
        return request_id

    def verify(self, request_id: str) -> Bound | None:
        """What the id says, or None when this service did not issue it."""
        parts = request_id.split("-")
        if len(parts) != 4 or not all(parts):
            return None
        nonce, version_hex, key, mac = parts
        if not hmac.compare_digest(mac, self._mac(nonce, version_hex, key)):
            return None
        try:
            return Bound(nonce, bytes.fromhex(version_hex).decode(), key)
        except ValueError:
            return None


def _create_secret_file(path: Path) -> None:
    """Write a fresh secret to ``path`` (0600) unless another process made it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and fails if it exists: every worker ends up with one secret
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def secret_path(state_dir: str, configured: str | None = None) -> Path:
    """Where the shared secret lives: ``serving.feedback_secret_file`` or ``<state_dir>/feedback.key``."""
    return (REPO_ROOT / (configured or str(Path(state_dir) / SECRET_FILE))).resolve()


def load_secret(path: Path, environ: dict[str, str] | None = None) -> bytes:
    """The shared secret: ``MLOPS_FEEDBACK_SECRET``, else the file at ``path`` (created if missing)."""
    env = os.environ if environ is None else environ
    if env.get(SECRET_ENV):
        return env[SECRET_ENV].encode()
    try:
        if not path.exists():
            _create_secret_file(path)
        return path.read_text().strip().encode()
    except OSError as exc:
        raise SecretError(
            f"request-id secret file {path}: {exc.strerror}; make serving.state_dir writable "
            f"or set {SECRET_ENV}"
        ) from None
