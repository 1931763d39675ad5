"""The stack's report server: a local storage root's ``reports/`` folder over HTTP on 127.0.0.1.

Alerts and the approval form link local reports (Data Docs, drift reports) as
``http://127.0.0.1:PORT/reports/...`` (``ml.storage.browsable_url``); this serves them, read-only
(GET and HEAD). A path outside ``reports/`` (``..``, an absolute path, a symlink that leads out) is
refused with 403. S3 roots need no server: their links are presigned.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ml.storage import REPORTS_PREFIX, UnsafeKeyError, safe_key

HOST = "127.0.0.1"


def report_path(root: Path, request_path: str) -> Path | None:
    """The file or folder under ``root/reports`` a request path names; None when it is refused."""
    name = unquote(urlsplit(request_path).path).removeprefix("/").removesuffix("/")
    try:
        key = safe_key(name)
    except UnsafeKeyError:
        return None
    if key != REPORTS_PREFIX and not key.startswith(f"{REPORTS_PREFIX}/"):
        return None
    reports = (root / REPORTS_PREFIX).resolve()
    target = (root / key).resolve()
    return target if target == reports or reports in target.parents else None


class ReportsHandler(SimpleHTTPRequestHandler):
    """Serves ``root/reports`` only; ``/healthz`` answers ``ok`` and ``/`` leads to ``/reports/``."""

    def __init__(self, *args: Any, root: Path, **kwargs: Any) -> None:
        self.root = root
        super().__init__(*args, directory=str(root), **kwargs)

    def send_head(self) -> Any:
        path = urlsplit(self.path).path
        if path == "/healthz":
            return self._reply(HTTPStatus.OK, b"ok\n")
        if path == "/":
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", f"/{REPORTS_PREFIX}/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if report_path(self.root, self.path) is None:
            self.send_error(HTTPStatus.FORBIDDEN, f"only {REPORTS_PREFIX}/ is served")
            return None
        return super().send_head()

    def translate_path(self, path: str) -> str:
        found = report_path(self.root, path)
        return str(found) if found else str(self.root / REPORTS_PREFIX / ".refused")

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def _reply(self, status: HTTPStatus, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def make_server(root: Path, port: int) -> ThreadingHTTPServer:
    """A report server for ``root`` (the storage root) on 127.0.0.1:``port`` (0: any free port)."""
    server = ThreadingHTTPServer((HOST, port), partial(ReportsHandler, root=root.resolve()))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m ml.ops.reports [--root DIR] [--port N]``; defaults from the config."""
    from ml.config import load_settings
    from ml.storage import resolve_local_root

    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=settings.storage.root, help="the local storage root")
    parser.add_argument("--port", type=int, default=settings.reports.port)
    args = parser.parse_args(argv)
    if args.root.startswith("s3://"):
        print("storage is on S3: reports are linked presigned, no server needed", file=sys.stderr)
        return 2
    root = resolve_local_root(args.root)
    server = make_server(root, args.port)
    print(f"serving {root / REPORTS_PREFIX} on http://{HOST}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
