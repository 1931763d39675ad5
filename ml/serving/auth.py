"""API keys: where they come from, and a constant-time check of a bearer header."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

KEYS_ENV = "MLOPS_API_KEYS"
KEYS_FILE_ENV = "MLOPS_API_KEYS_FILE"


def api_keys(environ: dict[str, str] | None = None, keys_file: str | None = None) -> frozenset[str]:
    """Accepted API keys: ``MLOPS_API_KEYS`` (comma-separated) plus one per line of the keys file."""
    env = os.environ if environ is None else environ
    keys = {key.strip() for key in env.get(KEYS_ENV, "").split(",") if key.strip()}
    path = env.get(KEYS_FILE_ENV) or keys_file
    if path:
        keys |= {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    return frozenset(keys)


def key_matches(header: str | None, keys: frozenset[str]) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header against the keys."""
    if not header or not header.startswith("Bearer "):
        return False
    offered = header.removeprefix("Bearer ").strip().encode()
    return any(hmac.compare_digest(offered, key.encode()) for key in keys)
