"""The page the service serves at ``/ui``: one self-contained HTML file, no asset from outside."""

from __future__ import annotations

from functools import cache
from pathlib import Path

PAGE_FILE = Path(__file__).with_name("ui.html")
PAGE_LINK_SECONDS = 900  # the status panel's presigned report links: any predict key may read them
# The page runs only its own inline script and talks only to this service.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src blob: data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@cache
def page_html() -> str:
    return PAGE_FILE.read_text(encoding="utf-8")
