"""The one error release steps raise: a deploy step cannot go on (the message says why)."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deploy step cannot go on; the message says why."""
