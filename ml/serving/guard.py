"""The service's front door (ASGI middleware): who may call what, how big a body may be, and
errors that tell the client what to do without telling it how the service failed.

Before the web framework parses anything it checks the API key and its role for the route,
refuses bodies over the limit with a 413 the client can read (the rest of the body is read and
discarded, up to a bound, so the connection is not reset under the client), checks multipart
bodies against the route's contract, records every admin request, and turns an unhandled
exception into a JSON 500 with an incident id (the detail goes to the log under that id).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ml.serving import uploads
from ml.serving.auth import ANONYMOUS, ApiKey, authenticate, is_loopback
from ml.serving.uploads import incident_id

log = logging.getLogger(__name__)

KEY_ID_HEADER = b"x-mlops-key-id"  # set by the guard for the app behind it (never taken from a client)
UPLOADS_SCOPE_KEY = "mlops.uploads"  # the files of a checked multipart body, for the app behind the guard
# Probes, and pages that hold no data (the page and Swagger UI ask for a key before they call anything).
OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/ui", "/", "/docs", "/docs.json")
OPEN_PREFIXES = ("/static_content/",)  # Swagger UI's own scripts and styles, shipped with BentoML
ROUTE_ROLES = {
    "/predict": "predict",
    "/ui/status": "predict",
    "/predict_batch": "predict",
    "/feedback": "feedback",
    "/version": "admin",
    "/metrics": "admin",
}
ROUTE_METHODS = {  # what each guarded route answers; anything else is a 405 before the app sees it
    "/predict": ("POST",),
    "/predict_batch": ("POST",),
    "/feedback": ("POST",),
    "/ui/status": ("GET", "HEAD"),
    "/version": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
}
DRAIN_TIMEOUT_SECONDS = 30.0

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
OnError = Callable[[str, int], None]  # (code, status): count a refusal
OnAdmin = Callable[[str, str, str, int], None]  # (key id, method, path, status): record an admin request


@dataclass(frozen=True)
class GuardPolicy:
    keys: dict[str, ApiKey]
    max_bytes: int
    drain_bytes: int
    route_roles: dict[str, str] = field(default_factory=lambda: dict(ROUTE_ROLES))
    route_methods: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(ROUTE_METHODS))
    open_paths: tuple[str, ...] = OPEN_PATHS
    open_prefixes: tuple[str, ...] = OPEN_PREFIXES

    def is_open(self, method: str, path: str) -> bool:
        """Reads of the open paths need no key; anything else sent there goes through the guard."""
        return method in ("GET", "HEAD") and (path in self.open_paths or path.startswith(self.open_prefixes))


class Refusal(Exception):
    """An answer the guard gives instead of the app."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        key_id: str = "unauthenticated",
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}
        self.key_id = key_id  # who was refused, for the admin audit


def caller(policy: GuardPolicy, path: str, authorization: str | None, client_host: str) -> str:
    """The key id allowed to call ``path``; ``Refusal`` (401/403) when none is."""
    if not policy.keys:
        return ANONYMOUS  # no keys: the service only ever listens on loopback
    key = authenticate(authorization, policy.keys)
    if path == "/metrics" and is_loopback(client_host):
        return key.key_id if key else "loopback"  # a local Prometheus or monitor needs no key
    if key is None:
        raise Refusal(
            401, "unauthorized", "send Authorization: Bearer <api key>", {"WWW-Authenticate": "Bearer"}
        )
    role = policy.route_roles.get(path)
    if role is not None and role not in key.roles:
        raise Refusal(403, "forbidden", f"this API key does not have the {role!r} role", key_id=key.key_id)
    return key.key_id


def request_problem(policy: GuardPolicy, scope: Scope) -> None:
    """``Refusal`` for a request no route can take as sent: a method the route does not answer (405),
    or two Content-Type headers (400: the guard and the framework behind it could each read another)."""
    allowed = policy.route_methods.get(scope["path"])
    if allowed is not None and scope["method"] not in allowed:
        detail = f"{scope['path']} answers {' and '.join(allowed)}"
        raise Refusal(405, "method_not_allowed", detail, {"Allow": ", ".join(allowed)})
    if sum(name.lower() == b"content-type" for name, _ in scope["headers"]) > 1:
        raise Refusal(400, "ambiguous_content_type", "send one Content-Type header")


async def drain(receive: Receive, limit: int, timeout: float = DRAIN_TIMEOUT_SECONDS) -> bool:
    """Read and discard the rest of a request body (at most ``limit`` bytes); True when it ended."""
    loop = asyncio.get_running_loop()
    deadline, read = loop.time() + timeout, 0
    while read <= limit:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return True
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


def _json_head(status: int, body: bytes, headers: dict[str, str]) -> Message:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": raw}


class Guard:
    """ASGI middleware: auth and roles, the size limit, body checks, admin audit, hidden 500s."""

    def __init__(
        self, app: Any, policy: GuardPolicy, on_error: OnError | None = None, on_admin: OnAdmin | None = None
    ) -> None:
        self.app, self.policy = app, policy
        self.on_error, self.on_admin = on_error, on_admin

    async def reply(
        self,
        send: Send,
        refusal: Refusal,
        receive: Receive | None = None,
        *,
        expect_continue: bool = False,
        drain_limit: int | None = None,
    ) -> None:
        """Send a JSON error; with ``receive``, drain the unread body (up to ``drain_limit``, by default
        ``drain_bytes``) before the answer completes."""
        if self.on_error is not None:
            self.on_error(refusal.code, refusal.status)
        body = json.dumps({"error": refusal.code, "detail": refusal.detail}).encode()
        headers = dict(refusal.headers)
        if receive is not None and expect_continue:
            headers["Connection"] = "close"  # the client holds its body back: nothing to drain
            receive = None
        await send(_json_head(refusal.status, body, headers))
        await send({"type": "http.response.body", "body": body, "more_body": receive is not None})
        if receive is not None:
            # the answer is in the client's buffer already; it reads it once it has sent its body
            await drain(receive, self.policy.drain_bytes if drain_limit is None else drain_limit)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.policy.is_open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = (scope.get("client") or ("", 0))[0]
        admin = self.policy.route_roles.get(scope["path"]) == "admin"
        try:
            key_id = caller(self.policy, scope["path"], headers.get("authorization"), client)
            request_problem(self.policy, scope)
        except Refusal as refusal:  # an unauthorised body is read no further than an authorised one may be
            limit = min(self.policy.max_bytes, self.policy.drain_bytes)
            expect_continue = headers.get("expect", "").lower() == "100-continue"
            replying = self._audited(send, refusal.key_id, scope) if admin else send
            await self.reply(replying, refusal, receive, expect_continue=expect_continue, drain_limit=limit)
            return
        scope = {**scope, "headers": _with_key_id(scope["headers"], key_id)}
        await self._guarded(scope, receive, self._audited(send, key_id, scope) if admin else send, headers)

    def _audited(self, send: Send, key_id: str, scope: Scope) -> Send:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start" and self.on_admin is not None:
                self.on_admin(key_id, scope["method"], scope["path"], int(message["status"]))
            await send(message)

        return recording

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        expect_continue = headers.get("expect", "").lower() == "100-continue"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.policy.max_bytes:
            refusal = Refusal(413, "request_too_large", f"body over {self.policy.max_bytes} bytes")
            await self.reply(send, refusal, receive, expect_continue=expect_continue)
            return
        if scope["method"] != "POST":
            await self._call_app(scope, receive, send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        checked = uploads.checked_body(scope["path"], body, headers.get("content-type", ""))
        if isinstance(checked, tuple):
            await self.reply(send, Refusal(*checked))
            return
        if checked is not None:  # the files, parsed once: the route need not parse the body again
            scope = {**scope, UPLOADS_SCOPE_KEY: checked}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._call_app(scope, replay, send)

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when the client left or the body passed the limit (answered)."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.policy.max_bytes:
                refusal = Refusal(413, "request_too_large", f"body over {self.policy.max_bytes} bytes")
                await self.reply(send, refusal, receive if more else None)
                return None
        return bytes(body)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        framework_error: Message | None = None  # a plain-text 404 or 405 of the framework, held back

        async def tracking(message: Message) -> None:
            nonlocal started, framework_error
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (404, 405) and _plain_text(message):
                    framework_error = message
                    return
            elif framework_error is not None:  # its body is dropped: the client gets the JSON answer
                if not message.get("more_body", False):
                    await self.reply(send, _as_refusal(scope, framework_error))
                return
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            incident = incident_id()
            log.exception("unhandled error on %s %s [incident %s]", scope["method"], scope["path"], incident)
            if started:
                raise
            detail = (
                f"the service failed on this request: retry, and quote incident {incident} if it persists"
            )
            await self.reply(send, Refusal(500, "internal_error", detail))


def _plain_text(start: Message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/plain") for k, v in start["headers"])


def _as_refusal(scope: Scope, start: Message) -> Refusal:
    """The framework's own 404 or 405 (plain text) as the JSON error every other refusal is."""
    if start["status"] == 404:
        return Refusal(404, "not_found", f"no route {scope['path']}")
    allow = next((v.decode("latin-1") for k, v in start["headers"] if k.lower() == b"allow"), "")
    return Refusal(405, "method_not_allowed", f"{scope['path']} answers {allow}", {"Allow": allow})


def _with_key_id(raw: list[tuple[bytes, bytes]], key_id: str) -> list[tuple[bytes, bytes]]:
    """The request headers with the caller's key id set by the guard (a client's own is dropped)."""
    return [(k, v) for k, v in raw if k.lower() != KEY_ID_HEADER] + [(KEY_ID_HEADER, key_id.encode())]
