"""Ops: start and stop the long-running pieces on one machine (``make up`` / ``make down``)."""
