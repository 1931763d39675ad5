"""A landing day full of hostile files, with the outcome each object must get."""

from __future__ import annotations

import csv
import datetime as dt
import io
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ml.storage import Storage

CLASSES = ["electronics", "clothing", "home", "books", "toys"]


def photo(seed: int, size: tuple[int, int] = (160, 120), mode: str = "RGB") -> Image.Image:
    """A textured image with structure (passes brightness/contrast checks)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / (5 + seed % 7)) + np.cos(yy / (4 + seed % 5))) * 60 + 128
    rgb = np.stack([base + rng.normal(0, 20, base.shape) + 15 * c for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A valid 1-bit PNG whose header claims width x height pixels; a few hundred KB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def padded_png(seed: int, total_bytes: int) -> bytes:
    """A small valid PNG made ``total_bytes`` long by a private ancillary chunk of random bytes.

    Cheap to decode (the decoder skips the chunk), expensive to hold: what a memory test needs.
    """
    png = encode(photo(seed), "PNG")
    head, tail = png[:33], png[33:]  # signature + IHDR, then the rest
    size = max(0, total_bytes - len(png) - 12)
    body = b"prVt" + np.random.default_rng(seed).bytes(size)
    chunk = size.to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return head + chunk + tail


# Names a real bucket holds that are legal paths and must be ingested like any other.
AWKWARD_NAMES = ("holiday photo 1.png", "100% cotton.png", "café-crème.png", "Ünïcödé ß 名前.png")


def land_awkward_names(storage: Storage, day: dt.date, seed: int = 2000) -> dict[str, str]:
    """Land one image under each of ``AWKWARD_NAMES`` (no labels.csv); returns landed key -> name."""
    keys = {}
    for index, name in enumerate(AWKWARD_NAMES):
        key = f"landing/{day.isoformat()}/images/{name}"
        storage.write_bytes(key, encode(photo(seed + index), "PNG"))
        keys[key] = name
    return keys


def write_labels(storage: Storage, day: dt.date, rows: list[tuple[str, str]]) -> None:
    """labels.csv for ``rows`` (filename, label), quoted where CSV needs it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(rows)
    storage.write_bytes(f"landing/{day.isoformat()}/labels.csv", buffer.getvalue().encode())


def with_exif_gps(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SpyCam"  # Make
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}  # GPS IFD
    return encode(image, "JPEG", exif=exif, quality=90)


@dataclass
class HostileDay:
    day: dt.date
    rows: list[tuple[str, str]] = field(default_factory=list)  # (filename, label) as written
    expect_file: dict[str, str] = field(default_factory=dict)  # landed key -> reason ("" = curated)
    expect_row_reason: dict[int, str] = field(default_factory=dict)  # csv line -> reason ("" = curated)
    good_count: int = 0

    def row(self, name: str, label: str, reason: str = "") -> None:
        """A labels.csv row and the reason it must get ("" = curated)."""
        self.rows.append((name, label))
        self.expect_row_reason[len(self.rows) + 1] = reason


def land_hostile_day(storage: Storage, day: dt.date, good: int = 48) -> HostileDay:
    """Land ``good`` clean images plus one of every hostile case; labels.csv written last."""
    spec = HostileDay(day)
    base = f"landing/{day.isoformat()}"

    def put(
        name: str, data: bytes, label: str | None, reason: str = "", row_reason: str | None = None
    ) -> None:
        storage.write_bytes(f"{base}/images/{name}", data)
        spec.expect_file[f"{base}/images/{name}"] = reason
        if label is not None:
            spec.row(name, label, reason if row_reason is None else row_reason)

    for i in range(good):
        fmt = "JPEG" if i % 3 else "PNG"
        put(f"good_{i:03d}.{fmt.lower()}", encode(photo(i), fmt), CLASSES[i % 5])
    spec.good_count = good
    jpeg = encode(photo(1001, (300, 200)), "JPEG", quality=90)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "toys", "corrupt_image")
    put("empty.jpg", b"", "toys", "empty_file")
    put("text.jpg", b"this is not an image, just text named .jpg\n" * 20, "books", "not_an_image")
    put("bomb.png", png_bomb(), "home", "too_many_pixels")
    put("unknown_label.png", encode(photo(1002), "PNG"), "spaceships", "unknown_label")
    put("orphan.png", encode(photo(1003), "PNG"), None, "orphan_file")
    put("cmyk.jpg", encode(photo(1004).convert("CMYK"), "JPEG"), "clothing")
    put(
        "gray16.png",
        encode(Image.fromarray(np.asarray(photo(1005).convert("L"), np.uint16) * 257), "PNG"),
        "home",
    )
    put("scan.tiff", encode(photo(1006), "TIFF"), "books")
    put("alpha.png", encode(photo(1007).convert("RGBA"), "PNG"), "toys")
    put("gps.jpg", with_exif_gps(photo(1008)), "electronics")
    put("anim.gif", encode(photo(1009), "GIF"), "toys", "format_not_allowed")
    put("tiny.png", encode(photo(1010, (12, 12)), "PNG"), "toys", "bad_dimensions")
    put("black.png", encode(Image.new("RGB", (200, 200)), "PNG"), "home", "blank_or_saturated")
    put("png_named.jpg", encode(photo(1011), "PNG"), "books")  # content wins over extension
    put("dup_a.png", encode(photo(1012), "PNG"), "home")
    put("dup_b.png", encode(photo(1012), "PNG"), "home")  # exact duplicate content: collapses
    put("conflict_a.png", encode(photo(1013), "PNG"), "toys", "conflicting_labels_same_content")
    put("conflict_b.png", encode(photo(1013), "PNG"), "books", "conflicting_labels_same_content")
    put("twice.png", encode(photo(1014), "PNG"), "clothing")
    spec.row("twice.png", "clothing")  # exact duplicate row: collapses
    put("nolabel.png", encode(photo(1016), "PNG"), "", "missing_label")
    put("relabelled.png", encode(photo(1015), "PNG"), "toys", "conflicting_labels")
    spec.row("relabelled.png", "books", "conflicting_labels")  # same file, two labels
    for index, name in enumerate(AWKWARD_NAMES):  # spaces, '%', non-ASCII: legal, ingested as any other
        put(name, encode(photo(1020 + index), "PNG"), CLASSES[index % 5])
    spec.row("../../../etc/passwd", "toys", "unsafe_filename")
    spec.row("never_landed.jpg", "toys", "file_missing")
    storage.write_bytes(f"{base}/notes.txt", b"stray file outside images/")
    spec.expect_file[f"{base}/notes.txt"] = "unexpected_location"
    csv_text = "filename,label,source\n" + "".join(
        f"{name},{label},hostile-test\n" for name, label in spec.rows
    )
    storage.write_bytes(f"{base}/labels.csv", csv_text.encode())
    return spec
