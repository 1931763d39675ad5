"""Uploads checked by content, and client errors as 4xx answers.

``decode_upload`` turns one uploaded file into the model's input (or a ``BadRequest``);
``upload_problem`` checks a raw multipart body against a route's contract before the web
framework parses it, so a malformed body is the client's 400, not a server error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from ml.data.images import ImageLimits, Rejected, open_checked, pixel_statistics
from ml.training.preprocessing import Preprocessing, to_array


class BadRequest(ValueError):
    """A client error: ``status`` (4xx), a stable ``code`` and a message for the JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.message}


def incident_id() -> str:
    """A short id that ties a client's error answer to the detail kept in the service log."""
    return uuid.uuid4().hex[:12]


_REJECTION_STATUS = {"file_too_large": 413, "too_many_pixels": 413, "empty_file": 400}


def rejection(exc: Rejected) -> BadRequest:
    """Map an image rejection to its HTTP status: 413 for size limits, 415 for formats, else 400."""
    status = _REJECTION_STATUS.get(
        exc.reason, 415 if exc.reason in ("not_an_image", "format_not_allowed") else 400
    )
    return BadRequest(status, exc.reason, exc.detail)


@dataclass(frozen=True)
class Decoded:
    array: np.ndarray  # (3, S, S) float32, the model's input
    properties: dict[str, float]  # what drift compares (sizes, bytes, brightness, contrast, blur)
    image_format: str


def decode_upload(data: bytes, limits: ImageLimits, prep: Preprocessing) -> Decoded:
    """Check an upload by content and turn it into the model's input; ``BadRequest`` when it is not one."""
    try:
        _, rgb, props = open_checked(data, limits, prep.draft_side())
    except Rejected as exc:
        raise rejection(exc) from None
    full_size = (props["upright_width"], props["upright_height"])
    measured = pixel_statistics(rgb, phash=False, scale=props["draft_scale"], full_size=full_size)
    properties = {
        "width": float(full_size[0]),
        "height": float(full_size[1]),
        "file_bytes": float(len(data)),
        **{key: float(value) for key, value in measured.items()},
    }
    return Decoded(to_array(rgb, prep), properties, str(props["format"]))


FILE_FIELDS = {"/predict": ("image", 1), "/predict_batch": ("images", None)}  # field, exact count
JSON_ROUTES = ("/feedback",)
Problem = tuple[int, str, str]  # (status, code, detail)


@dataclass
class Part:
    """One part of a multipart body: its Content-Disposition options and its bytes."""

    options: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def multipart_parts(body: bytes, boundary: bytes) -> list[Part] | Problem:
    """Every part of a multipart body (options and bytes), or why it is malformed."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    parts: list[Part] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}
    ended = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            parts[-1].options |= parse_options_header(header["value"])[1]
        header["field"], header["value"] = b"", b""

    callbacks = {
        "on_part_begin": lambda: parts.append(Part()),
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: parts[-1].chunks.append(data[start:end]),
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 - the parser raises several kinds for malformed input
        return 400, "malformed_multipart", f"malformed multipart body: {exc}"
    if not ended:
        return 400, "malformed_multipart", "multipart body ends before its closing boundary"
    return parts


def upload_problem(path: str, body: bytes, content_type: str) -> Problem | None:
    """(status, code, detail) when a body breaks its route's contract, else None.

    BentoML answers a malformed multipart body, a text field where a file belongs or an unexpected
    field with a 500; checking the body first makes each of them the client's 4xx.
    """
    checked = checked_body(path, body, content_type)
    return checked if isinstance(checked, tuple) else None


def checked_body(path: str, body: bytes, content_type: str) -> list[bytes] | Problem | None:
    """A body checked against its route's contract: why it breaks it, the files of a file route, or None."""
    from python_multipart.multipart import parse_options_header

    if path in JSON_ROUTES:
        kind, _ = parse_options_header(content_type)
        return (
            None if kind == b"application/json" else (415, "unsupported_media_type", "send application/json")
        )
    if path not in FILE_FIELDS:
        return None
    return uploaded_files(path, body, content_type)


def uploaded_files(path: str, body: bytes, content_type: str) -> list[bytes] | Problem:
    """The files of a multipart body sent to a file route (``FILE_FIELDS``), or why it breaks the contract."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type)
    field_name, count = FILE_FIELDS[path]
    expected = f"send multipart/form-data with the image file in field {field_name!r}"
    if kind != b"multipart/form-data":
        return 415, "unsupported_media_type", expected
    boundary = options.get(b"boundary")
    if not boundary:
        return 400, "malformed_multipart", "multipart/form-data without a boundary"
    parts = multipart_parts(body, boundary)
    if isinstance(parts, tuple):
        return parts
    names = [part.options.get(b"name", b"").decode("latin-1") for part in parts]
    unexpected = sorted(set(names) - {field_name})
    if unexpected:
        return 400, "unexpected_field", f"unexpected field(s) {unexpected}: {expected}"
    files = [part for part in parts if b"filename" in part.options]
    if len(files) != len(parts) or not files or (count is not None and len(files) != count):
        return 400, "missing_image", f"{expected} ({'exactly one' if count else 'one or more'} file part)"
    return [part.data for part in files]
