"""API keys with roles: where they come from, how they are checked, and the id a key is known by.

``MLOPS_API_KEYS`` holds comma-separated entries ``KEY`` or ``KEY:role+role``; a keys file
(``MLOPS_API_KEYS_FILE`` or ``serving.api_keys_file``) holds one ``KEY`` or ``KEY role,role`` per
line. A key without roles has every role. Keys shorter than ``MIN_KEY_LENGTH`` are refused, and
no error message ever contains a key: keys are named by their position, or by their id (a
short hash) once accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

KEYS_ENV = "MLOPS_API_KEYS"
KEYS_FILE_ENV = "MLOPS_API_KEYS_FILE"
ROLES = ("predict", "feedback", "admin")
MIN_KEY_LENGTH = 32
ANONYMOUS = "anonymous"  # the caller's id when no key is configured (loopback only)
LOOPBACK_NAMES = ("localhost",)


class KeyConfigError(ValueError):
    """The configured API keys are unusable; the message names the entry, never the key."""


@dataclass(frozen=True)
class ApiKey:
    secret: str
    roles: frozenset[str]

    @property
    def key_id(self) -> str:
        return key_id(self.secret)


def key_id(secret: str) -> str:
    """How a key is named in logs and audit records: a short hash, never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def _parse_roles(text: str, where: str) -> frozenset[str]:
    roles = frozenset(role.strip() for role in text.replace("+", ",").split(",") if role.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise KeyConfigError(f"{where}: unknown role(s) {unknown}; roles are {', '.join(ROLES)}")
    return roles or frozenset(ROLES)


def _checked(secret: str, roles: str, where: str) -> ApiKey:
    if len(secret) < MIN_KEY_LENGTH:
        raise KeyConfigError(
            f"{where}: the API key is {len(secret)} characters long; keys need at least {MIN_KEY_LENGTH} "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if any(char.isspace() or char in ",:" for char in secret):
        raise KeyConfigError(f"{where}: an API key may not contain whitespace, ',' or ':'")
    return ApiKey(secret, _parse_roles(roles, where))


def _env_entries(value: str) -> Iterable[ApiKey]:
    for index, entry in enumerate((part.strip() for part in value.split(",")), start=1):
        if entry:
            secret, _, roles = entry.partition(":")
            yield _checked(secret, roles, f"{KEYS_ENV} entry {index}")


def _file_entries(path: str) -> Iterable[ApiKey]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise KeyConfigError(f"API keys file {path} cannot be read: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            secret, _, roles = line.strip().partition(" ")
            yield _checked(secret, roles, f"API keys file {path} line {number}")


def key_table(environ: dict[str, str] | None = None, keys_file: str | None = None) -> dict[str, ApiKey]:
    """Every configured key by its secret (roles of a key given twice are merged)."""
    env = os.environ if environ is None else environ
    entries = list(_env_entries(env.get(KEYS_ENV, "")))
    path = env.get(KEYS_FILE_ENV) or keys_file
    if path:
        entries += list(_file_entries(path))
    table: dict[str, ApiKey] = {}
    for entry in entries:
        known = table.get(entry.secret)
        table[entry.secret] = ApiKey(entry.secret, entry.roles | (known.roles if known else frozenset()))
    return table


def api_keys(environ: dict[str, str] | None = None, keys_file: str | None = None) -> frozenset[str]:
    """The accepted keys themselves (whatever their roles)."""
    return frozenset(key_table(environ, keys_file))


def admin_key(environ: dict[str, str] | None = None, keys_file: str | None = None) -> str:
    """A configured key with the admin role ("" when there is none), for local tools that call /version."""
    keys = sorted(key.secret for key in key_table(environ, keys_file).values() if "admin" in key.roles)
    return keys[0] if keys else ""


def offered_key(header: str | None) -> str | None:
    """The credentials of a ``Bearer`` Authorization header (the scheme in any case, RFC 9110 11.1)."""
    parts = (header or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip()


def authenticate(header: str | None, table: dict[str, ApiKey]) -> ApiKey | None:
    """The key an ``Authorization: Bearer <key>`` header carries, compared in constant time."""
    offered = offered_key(header)
    if offered is None:
        return None
    found = None
    for key in table.values():  # compare against every key: the time does not say which one matched
        if hmac.compare_digest(offered.encode(), key.secret.encode()):
            found = key
    return found


def key_matches(header: str | None, keys: frozenset[str]) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header against the keys."""
    return authenticate(header, {key: ApiKey(key, frozenset(ROLES)) for key in keys}) is not None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
