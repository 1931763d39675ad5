"""The service's OpenAPI document says how to authenticate: a bearer scheme on every guarded route.

BentoML generates ``/docs.json`` from the service's APIs but knows nothing of the guard in front of
them, so Swagger UI (``/``, also reached as ``/docs``) would offer no way to send a key. This
middleware adds the ``bearerAuth`` scheme to that document as it leaves the service, with
``security: []`` on the routes that need no key, and the operations of the routes the service
serves outside BentoML's API layer (``POST /predict``, ``POST /predict_batch``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

from ml.serving.guard import Message, Receive, Scope, Send

SPEC_PATH = "/docs.json"
BEARER_SCHEME = "bearerAuth"
_ERROR = {"description": "A client error: JSON ``error`` (a stable code) and ``detail``"}
MOUNTED_OPERATIONS: dict[str, dict[str, Any]] = {
    "/predict": {
        "post": {
            "summary": "Classify one image",
            "description": "Class, calibrated confidence and probabilities, model version, track (stable or "
            "canary) and the request id /feedback takes.",
            "operationId": "predict",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "The answer",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **{status: _ERROR for status in ("400", "401", "403", "413", "415", "503")},
            },
        }
    },
    "/predict_batch": {
        "post": {
            "summary": "Classify several images",
            "description": "One result per image, in order: the answer /predict gives, or that image's own "
            "error (``error``, ``detail``, ``status``). The request fails as a whole only when every "
            "image is refused (with the first one's status).",
            "operationId": "predict_batch",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["images"],
                            "properties": {
                                "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "The results",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **{status: _ERROR for status in ("400", "401", "403", "413", "415", "503")},
            },
        }
    },
}


def with_mounted_operations(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the operations of the routes served outside BentoML's API layer."""
    paths = spec.setdefault("paths", {})
    for path, operations in MOUNTED_OPERATIONS.items():
        paths.setdefault(path, copy.deepcopy(operations))
    return spec


def with_bearer_scheme(spec: dict[str, Any], open_paths: Iterable[str]) -> dict[str, Any]:
    """``spec`` with the bearer scheme required by default and waived on ``open_paths``."""
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (MLOPS_API_KEYS or the keys file); its roles decide what it may call.",
    }
    spec["security"] = [{BEARER_SCHEME: []}]
    waived = set(open_paths)
    for path, operations in (spec.get("paths") or {}).items():
        if path in waived and isinstance(operations, dict):
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation["security"] = []
    return spec


class BearerSpec:
    """ASGI middleware: rewrites the JSON answer of ``GET /docs.json``; every other request passes."""

    def __init__(self, app: Any, open_paths: Iterable[str]) -> None:
        self.app = app
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SPEC_PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, hold)
        if start is None:
            return
        data = bytes(body)
        if start["status"] == 200:
            spec = with_mounted_operations(json.loads(data))
            data = json.dumps(with_bearer_scheme(spec, self.open_paths)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})
