"""Deterministic demo product images: one class-like object drawn on a background, per RNG state.

Every pixel follows from the generator's state, so the same seed draws the same image. Drift
knobs (``brightness``, ``blur``, ``class_mix``) simulate a data source that changes over time.
"""

from __future__ import annotations

import colorsys
import io
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

DRIFT_KINDS = ("brightness", "blur", "class_mix")
KNOWN_CLASSES = ("electronics", "clothing", "home", "books", "toys")
MIN_SIDE, MAX_SIDE = 64, 800
DRAW_MIN_PX = 160  # objects smaller than this are drawn larger and downsampled (anti-aliasing)

Color = tuple[int, int, int]
Point = tuple[float, float]
Box = tuple[float, float, float, float]
Drawer = Callable[[Image.Image, np.random.Generator], None]


@dataclass(frozen=True)
class Drift:
    """A change in the data source: ``kind`` (one of ``DRIFT_KINDS``) at ``strength`` in [0, 1]."""

    kind: str
    strength: float

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"unknown drift kind {self.kind!r}: use one of {', '.join(DRIFT_KINDS)}")
        if not 0.0 <= self.strength <= 1.0:  # also rejects NaN
            raise ValueError(f"drift strength must be within [0, 1], got {self.strength!r}")

    @classmethod
    def parse(cls, spec: str) -> Drift:
        """Parse ``"kind:strength"``, e.g. ``"brightness:0.6"``."""
        kind, sep, raw = spec.strip().partition(":")
        if not sep:
            raise ValueError(f"drift {spec!r} must look like KIND:STRENGTH, e.g. brightness:0.6")
        try:
            strength = float(raw)
        except ValueError:
            raise ValueError(f"drift {spec!r}: strength {raw!r} is not a number") from None
        return cls(kind.strip(), strength)

    def __str__(self) -> str:
        return f"{self.kind}:{self.strength:g}"


# ---------------------------------------------------------------- small drawing helpers


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _pick(rng: np.random.Generator, count: int) -> int:
    return int(rng.integers(count))


def _hsv(hue: float, sat: float, val: float) -> Color:
    red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return (round(red * 255), round(green * 255), round(blue * 255))


def _mix(color: Color, other: Color, t: float) -> Color:
    return (
        round(color[0] + (other[0] - color[0]) * t),
        round(color[1] + (other[1] - color[1]) * t),
        round(color[2] + (other[2] - color[2]) * t),
    )


def _shade(color: Color, factor: float) -> Color:
    return (
        min(255, round(color[0] * factor)),
        min(255, round(color[1] * factor)),
        min(255, round(color[2] * factor)),
    )


def _bright(rng: np.random.Generator) -> Color:
    """A saturated, bright colour."""
    return _hsv(rng.random(), _u(rng, 0.75, 1.0), _u(rng, 0.85, 1.0))


def _pts(points: Sequence[Point], size: int) -> list[Point]:
    return [(x * size, y * size) for x, y in points]


def _box(box: Box, size: int) -> Box:
    x0, y0, x1, y1 = box
    return (x0 * size, y0 * size, x1 * size, y1 * size)


def _jitter(points: Sequence[Point], rng: np.random.Generator, amount: float) -> list[Point]:
    offsets = rng.uniform(-amount, amount, (len(points), 2))
    return [(x + float(dx), y + float(dy)) for (x, y), (dx, dy) in zip(points, offsets, strict=True)]


def _line_width(size: int, fraction: float) -> int:
    return max(1, round(size * fraction))


# ---------------------------------------------------------------- electronics


def _buttons(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, at: Point) -> None:
    radius = 0.013 * size
    x, y = at
    for index in range(1 + _pick(rng, 4)):
        color = (110, 230, 120) if index == 0 and rng.random() < 0.5 else (185, 185, 190)
        cx = (x - index * 0.04) * size
        draw.ellipse((cx - radius, y * size - radius, cx + radius, y * size + radius), fill=color)


def _monitor(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, body: Color) -> Box:
    width, height, top = _u(rng, 0.8, 0.95), _u(rng, 0.5, 0.62), _u(rng, 0.06, 0.12)
    x0, x1, bottom = 0.5 - width / 2, 0.5 + width / 2, top + height
    draw.rectangle(_box((0.46, bottom - 0.02, 0.54, bottom + 0.17), size), fill=_mix(body, (90, 90, 95), 0.4))
    draw.rounded_rectangle(_box((0.3, bottom + 0.15, 0.7, bottom + 0.21), size), 0.02 * size, fill=body)
    draw.rounded_rectangle(_box((x0, top, x1, bottom), size), 0.035 * size, fill=body)
    bezel = _u(rng, 0.025, 0.045)
    _buttons(draw, size, rng, (x1 - 0.05, bottom - bezel * 0.6))
    return _box((x0 + bezel, top + bezel, x1 - bezel, bottom - bezel * 1.5), size)


def _phone(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, body: Color) -> Box:
    width, height = _u(rng, 0.36, 0.52), _u(rng, 0.8, 0.94)
    x0, y0, x1, y1 = 0.5 - width / 2, 0.5 - height / 2, 0.5 + width / 2, 0.5 + height / 2
    draw.rectangle(_box((x1 - 0.01, y0 + 0.16, x1 + 0.012, y0 + 0.26), size), fill=_shade(body, 1.6))
    draw.rounded_rectangle(_box((x0, y0, x1, y1), size), _u(rng, 0.05, 0.09) * size, fill=body)
    draw.rounded_rectangle(_box((0.45, y0 + 0.03, 0.55, y0 + 0.042), size), 0.006 * size, fill=(90, 90, 95))
    if rng.random() < 0.5:
        draw.ellipse(
            _box((0.475, y1 - 0.075, 0.525, y1 - 0.025), size),
            outline=(160, 160, 165),
            width=_line_width(size, 0.006),
        )
    return _box((x0 + 0.025, y0 + 0.07, x1 - 0.025, y1 - 0.09), size)


def _laptop(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, body: Color) -> Box:
    lid_bottom = _u(rng, 0.52, 0.6)
    deck = _mix(body, (200, 200, 205), _u(rng, 0.0, 0.7))
    base = [
        (0.1, lid_bottom + 0.02),
        (0.9, lid_bottom + 0.02),
        (0.99, lid_bottom + 0.24),
        (0.01, lid_bottom + 0.24),
    ]
    draw.polygon(_pts(base, size), fill=deck)
    rows, cols = 3 + _pick(rng, 2), 10 + _pick(rng, 3)
    key_color = _shade(deck, 0.45)
    for row in range(rows):
        y = lid_bottom + 0.045 + row * 0.13 / rows
        left, right = 0.14 - row * 0.015, 0.86 + row * 0.015
        pitch = (right - left) / cols
        for col in range(cols):
            key = (left + col * pitch, y, left + (col + 0.8) * pitch, y + 0.1 / rows)
            draw.rectangle(_box(key, size), fill=key_color)
    draw.rounded_rectangle(_box((0.14, 0.06, 0.86, lid_bottom), size), 0.03 * size, fill=body)
    return _box((0.17, 0.09, 0.83, lid_bottom - 0.03), size)


def _television(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, body: Color) -> Box:
    width, height, top = _u(rng, 0.88, 0.98), _u(rng, 0.5, 0.62), _u(rng, 0.1, 0.18)
    x0, x1, bottom = 0.5 - width / 2, 0.5 + width / 2, top + height
    for foot in (0.2, 0.8):
        draw.polygon(
            _pts(
                [
                    (foot - 0.02, bottom),
                    (foot + 0.02, bottom),
                    (foot + 0.06, bottom + 0.1),
                    (foot - 0.06, bottom + 0.1),
                ],
                size,
            ),
            fill=body,
        )
    draw.rectangle(_box((x0, top, x1, bottom), size), fill=body)
    draw.ellipse(_box((x1 - 0.05, bottom - 0.018, x1 - 0.038, bottom - 0.006), size), fill=(230, 40, 40))
    bezel = _u(rng, 0.012, 0.025)
    return _box((x0 + bezel, top + bezel, x1 - bezel, bottom - bezel * 1.6), size)


def _screen_content(draw: ImageDraw.ImageDraw, box: Box, glow: Color, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    kind = _pick(rng, 3)
    if kind == 0:  # wallpaper band
        band = _mix(glow, (255, 255, 255), 0.55)
        draw.polygon(
            [(x0, y1), (x0 + 0.45 * width, y0), (x0 + 0.8 * width, y0), (x0 + 0.35 * width, y1)], fill=band
        )
    elif kind == 1:  # app icons
        cols, rows = 3 + _pick(rng, 3), 3 + _pick(rng, 4)
        cell_w, cell_h = width / cols, height / rows
        for row in range(rows):
            for col in range(cols):
                icon = (
                    x0 + (col + 0.2) * cell_w,
                    y0 + (row + 0.2) * cell_h,
                    x0 + (col + 0.8) * cell_w,
                    y0 + (row + 0.8) * cell_h,
                )
                draw.rounded_rectangle(icon, 0.15 * min(cell_w, cell_h), fill=_bright(rng))
    else:  # text lines
        lines = 4 + _pick(rng, 5)
        ink = _shade(glow, 0.55)
        for row in range(lines):
            y = y0 + (row + 0.6) * height / (lines + 1)
            length = width * _u(rng, 0.35, 0.85)
            draw.rectangle(
                (x0 + 0.08 * width, y, x0 + 0.08 * width + length, y + 0.35 * height / (lines + 1)), fill=ink
            )


_DEVICES = (_monitor, _phone, _laptop, _television)


def _draw_electronics(layer: Image.Image, rng: np.random.Generator) -> None:
    """A dark device body (monitor, phone, laptop, TV) around a bright glowing display."""
    draw, size = ImageDraw.Draw(layer), layer.width
    body = _hsv(rng.random(), _u(rng, 0.0, 0.35), _u(rng, 0.04, 0.22))
    glow_hue = _u(rng, 0.45, 0.7) if rng.random() < 0.75 else rng.random()
    glow = _hsv(glow_hue, _u(rng, 0.15, 0.65), _u(rng, 0.88, 1.0))
    screen = _DEVICES[_pick(rng, len(_DEVICES))](draw, size, rng, body)
    draw.rectangle(screen, fill=glow)
    _screen_content(draw, screen, glow, rng)


# ---------------------------------------------------------------- clothing

_GARMENTS: dict[str, tuple[tuple[Point, ...], tuple[tuple[Point, ...], ...]]] = {
    # name: (silhouette polygon, detail polylines drawn darker)
    "tshirt": (
        (
            (0.36, 0.08),
            (0.44, 0.13),
            (0.5, 0.15),
            (0.56, 0.13),
            (0.64, 0.08),
            (0.94, 0.28),
            (0.84, 0.44),
            (0.75, 0.38),
            (0.75, 0.94),
            (0.25, 0.94),
            (0.25, 0.38),
            (0.16, 0.44),
            (0.06, 0.28),
        ),
        (((0.36, 0.08), (0.44, 0.13), (0.5, 0.15), (0.56, 0.13), (0.64, 0.08)),),
    ),
    "sweater": (
        (
            (0.38, 0.06),
            (0.5, 0.12),
            (0.62, 0.06),
            (0.78, 0.12),
            (0.97, 0.78),
            (0.86, 0.82),
            (0.74, 0.4),
            (0.74, 0.94),
            (0.26, 0.94),
            (0.26, 0.4),
            (0.14, 0.82),
            (0.03, 0.78),
            (0.22, 0.12),
        ),
        (((0.38, 0.06), (0.5, 0.12), (0.62, 0.06)), ((0.27, 0.89), (0.73, 0.89))),
    ),
    "trousers": (
        ((0.27, 0.04), (0.73, 0.04), (0.79, 0.96), (0.57, 0.96), (0.5, 0.34), (0.43, 0.96), (0.21, 0.96)),
        (((0.27, 0.1), (0.73, 0.1)), ((0.5, 0.1), (0.5, 0.26))),
    ),
    "shorts": (
        ((0.2, 0.2), (0.8, 0.2), (0.88, 0.72), (0.56, 0.76), (0.5, 0.48), (0.44, 0.76), (0.12, 0.72)),
        (((0.2, 0.27), (0.8, 0.27)),),
    ),
    "dress": (
        (
            (0.38, 0.04),
            (0.44, 0.04),
            (0.5, 0.1),
            (0.56, 0.04),
            (0.62, 0.04),
            (0.64, 0.32),
            (0.86, 0.96),
            (0.14, 0.96),
            (0.36, 0.32),
        ),
        (((0.36, 0.32), (0.64, 0.32)),),
    ),
}


def _stripes(draw: ImageDraw.ImageDraw, size: int, period: float, color: Color, direction: int) -> None:
    width = max(1, round(period * 0.45))
    steps = int(2 * size / period) + 2
    for step in range(steps):
        offset = step * period
        if direction == 0:
            draw.rectangle((0, offset, size, offset + width), fill=color)
        elif direction == 1:
            draw.rectangle((offset, 0, offset + width, size), fill=color)
        else:
            draw.line([(offset, 0), (offset - size, size)], fill=color, width=width)


def _dots(draw: ImageDraw.ImageDraw, size: int, period: float, color: Color) -> None:
    radius = period * 0.22
    count = int(size / period) + 2
    for row in range(count):
        shift = period / 2 if row % 2 else 0.0
        for col in range(count):
            cx, cy = col * period + shift, row * period
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)


def _fabric(size: int, base: Color, rng: np.random.Generator) -> Image.Image:
    """A patterned fabric swatch: stripes (three directions), dots or checks."""
    fabric = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(fabric)
    accent = (
        (245, 242, 232) if rng.random() < 0.4 else _hsv(rng.random(), _u(rng, 0.3, 0.9), _u(rng, 0.2, 1.0))
    )
    period = size * _u(rng, 0.07, 0.16)
    kind = _pick(rng, 5)
    if kind < 3:
        _stripes(draw, size, period, accent, kind)
    elif kind == 3:
        _dots(draw, size, period, accent)
    else:
        _stripes(draw, size, period, accent, 0)
        _stripes(draw, size, period, _mix(accent, base, 0.5), 1)
    return fabric


def _draw_clothing(layer: Image.Image, rng: np.random.Generator) -> None:
    """A garment silhouette (t-shirt, sweater, trousers, shorts, dress) cut from patterned fabric."""
    size = layer.width
    names = sorted(_GARMENTS)
    outline, details = _GARMENTS[names[_pick(rng, len(names))]]
    points = _pts(_jitter(outline, rng, 0.015), size)
    base = _hsv(rng.random(), _u(rng, 0.3, 0.9), _u(rng, 0.45, 0.95))
    mask = Image.new("L", layer.size, 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    layer.paste(_fabric(size, base, rng), (0, 0), mask)
    draw = ImageDraw.Draw(layer)
    dark = _shade(base, 0.5)
    draw.polygon(points, outline=dark, width=_line_width(size, 0.012))
    for line in details:
        draw.line(_pts(line, size), fill=dark, width=_line_width(size, 0.02), joint="curve")


# ---------------------------------------------------------------- home


def _lamp(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    shade_color = _hsv(rng.random(), _u(rng, 0.05, 0.5), _u(rng, 0.7, 1.0))
    metal = _hsv(_u(rng, 0.05, 0.15), _u(rng, 0.0, 0.4), _u(rng, 0.3, 0.8))
    top_w, bottom_w = _u(rng, 0.14, 0.26), _u(rng, 0.3, 0.44)
    top = _u(rng, 0.04, 0.12)
    bottom = top + _u(rng, 0.25, 0.35)
    draw.ellipse(
        _box((0.5 - bottom_w * 0.7, bottom - 0.05, 0.5 + bottom_w * 0.7, bottom + 0.08), size),
        fill=(255, 236, 160),
    )
    draw.rectangle(_box((0.48, bottom, 0.52, 0.9), size), fill=metal)
    draw.ellipse(_box((0.3, 0.86, 0.7, 0.95), size), fill=metal)
    shade = [(0.5 - top_w, top), (0.5 + top_w, top), (0.5 + bottom_w, bottom), (0.5 - bottom_w, bottom)]
    draw.polygon(_pts(shade, size), fill=shade_color)
    draw.line(
        _pts([(0.5 - bottom_w, bottom), (0.5 + bottom_w, bottom)], size),
        fill=_shade(shade_color, 0.7),
        width=_line_width(size, 0.02),
    )


def _chair(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    wood = _hsv(_u(rng, 0.04, 0.11), _u(rng, 0.45, 0.8), _u(rng, 0.3, 0.7))
    dark = _shade(wood, 0.7)
    for leg in ((0.26, 0.58, 0.3, 0.86), (0.7, 0.58, 0.74, 0.86)):
        draw.rectangle(_box(leg, size), fill=dark)
    draw.rectangle(_box((0.22, 0.78, 0.78, 0.81), size), fill=dark)
    for post in ((0.24, 0.05, 0.3, 0.56), (0.7, 0.05, 0.76, 0.56)):
        draw.rectangle(_box(post, size), fill=wood)
    draw.rectangle(_box((0.22, 0.05, 0.78, 0.14), size), fill=wood)
    slats = 2 + _pick(rng, 3)
    for index in range(slats):
        x = 0.3 + (index + 0.5) * 0.4 / slats
        draw.rectangle(_box((x - 0.02, 0.14, x + 0.02, 0.5), size), fill=_shade(wood, 0.85))
    draw.polygon(_pts([(0.18, 0.5), (0.82, 0.5), (0.86, 0.6), (0.14, 0.6)], size), fill=_shade(wood, 1.15))
    if rng.random() < 0.4:
        draw.rounded_rectangle(_box((0.2, 0.46, 0.8, 0.53), size), 0.02 * size, fill=_bright(rng))
    for leg in ((0.15, 0.6, 0.21, 0.96), (0.79, 0.6, 0.85, 0.96)):
        draw.rectangle(_box(leg, size), fill=wood)


def _mug(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    white = rng.random() < 0.3
    color = (240, 238, 232) if white else _hsv(rng.random(), _u(rng, 0.3, 0.9), _u(rng, 0.5, 0.95))
    draw.ellipse(
        _box((0.55, 0.4, 0.86, 0.76), size), outline=_shade(color, 0.9), width=_line_width(size, 0.06)
    )
    draw.rounded_rectangle(_box((0.18, 0.28, 0.68, 0.9), size), 0.06 * size, fill=color)
    draw.ellipse(_box((0.18, 0.23, 0.68, 0.33), size), fill=_shade(color, 0.8))
    draw.ellipse(_box((0.21, 0.245, 0.65, 0.315), size), fill=(84, 52, 30))
    if rng.random() < 0.6:
        draw.rectangle(_box((0.18, 0.52, 0.68, 0.6), size), fill=_bright(rng))
    for index in range(2 + _pick(rng, 2)):
        x = 0.3 + index * 0.12
        steam = [(x, 0.2), (x + 0.03, 0.15), (x, 0.1), (x + 0.03, 0.05)]
        draw.line(_pts(steam, size), fill=(225, 225, 228), width=_line_width(size, 0.015), joint="curve")


def _plant(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    terracotta = rng.random() < 0.7
    pot = _hsv(_u(rng, 0.03, 0.08), _u(rng, 0.5, 0.75), _u(rng, 0.55, 0.85)) if terracotta else _bright(rng)
    for _ in range(5 + _pick(rng, 5)):
        angle = math.radians(_u(rng, -165, -15))
        length, width = _u(rng, 0.25, 0.5), _u(rng, 0.08, 0.15)
        dx, dy = math.cos(angle), math.sin(angle)
        base, tip = (0.5, 0.58), (0.5 + length * dx, 0.58 + length * dy)
        mid = (0.5 + 0.5 * length * dx, 0.58 + 0.5 * length * dy)
        sides = [
            (mid[0] - width / 2 * dy, mid[1] + width / 2 * dx),
            (mid[0] + width / 2 * dy, mid[1] - width / 2 * dx),
        ]
        leaf = _hsv(_u(rng, 0.22, 0.38), _u(rng, 0.5, 0.9), _u(rng, 0.35, 0.8))
        draw.polygon(_pts([base, sides[0], tip, sides[1]], size), fill=leaf)
        draw.line(_pts([base, tip], size), fill=_shade(leaf, 0.7), width=_line_width(size, 0.006))
    draw.polygon(_pts([(0.3, 0.6), (0.7, 0.6), (0.64, 0.96), (0.36, 0.96)], size), fill=pot)
    draw.rectangle(_box((0.27, 0.56, 0.73, 0.64), size), fill=_shade(pot, 0.85))


_HOME_ITEMS = (_lamp, _chair, _mug, _plant)


def _draw_home(layer: Image.Image, rng: np.random.Generator) -> None:
    """A household item built from a few shapes: lamp, chair, mug or potted plant."""
    _HOME_ITEMS[_pick(rng, len(_HOME_ITEMS))](ImageDraw.Draw(layer), layer.width, rng)


# ---------------------------------------------------------------- books


def _book_color(rng: np.random.Generator) -> Color:
    return _hsv(rng.random(), _u(rng, 0.3, 0.85), _u(rng, 0.25, 0.85))


def _title_color(rng: np.random.Generator) -> Color:
    return ((212, 175, 55), (245, 240, 225), (25, 25, 25))[_pick(rng, 3)]


def _book_row(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    count = 5 + _pick(rng, 8)
    widths = rng.uniform(0.6, 1.4, count)
    widths = widths / widths.sum() * _u(rng, 0.75, 0.92)
    baseline = _u(rng, 0.86, 0.92)
    if rng.random() < 0.5:
        shelf = _hsv(_u(rng, 0.05, 0.1), _u(rng, 0.4, 0.7), _u(rng, 0.3, 0.6))
        draw.rectangle(_box((0.02, baseline, 0.98, baseline + 0.05), size), fill=shelf)
    x = (1 - float(widths.sum())) / 2
    for width in widths.tolist():
        height = _u(rng, 0.5, 0.82)
        color = _book_color(rng)
        draw.rectangle(
            _box((x, baseline - height, x + width - 0.004, baseline), size),
            fill=color,
            outline=_shade(color, 0.6),
        )
        ink = _title_color(rng)
        for band in range(1 + _pick(rng, 3)):
            y = baseline - height + 0.06 + band * 0.05
            draw.rectangle(_box((x + 0.18 * width, y, x + 0.78 * width, y + 0.012), size), fill=ink)
        x += width


def _book_stack(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    count = 3 + _pick(rng, 5)
    thickness = rng.uniform(0.07, 0.14, count)
    thickness = thickness * min(1.0, 0.85 / float(thickness.sum()))
    bottom = 0.95
    for thick in thickness.tolist():
        length = _u(rng, 0.55, 0.88)
        x0 = 0.5 - length / 2 + _u(rng, -0.05, 0.05)
        color = _book_color(rng)
        draw.rectangle(
            _box((x0, bottom - thick, x0 + length, bottom), size), fill=color, outline=_shade(color, 0.6)
        )
        ink = _title_color(rng)
        middle = bottom - thick / 2
        draw.rectangle(
            _box((x0 + 0.2 * length, middle - thick * 0.12, x0 + 0.72 * length, middle + thick * 0.12), size),
            fill=ink,
        )
        for end in (x0 + 0.05 * length, x0 + 0.9 * length):
            draw.rectangle(_box((end, bottom - thick, end + 0.012, bottom), size), fill=ink)
        bottom -= thick


def _draw_books(layer: Image.Image, rng: np.random.Generator) -> None:
    """A row of standing book spines or a lying stack, with title bands."""
    arrange = _book_row if rng.random() < 0.6 else _book_stack
    arrange(ImageDraw.Draw(layer), layer.width, rng)


# ---------------------------------------------------------------- toys


def _star_points(cx: float, cy: float, radius: float, turn: float) -> list[Point]:
    points = []
    for index in range(10):
        r = radius if index % 2 == 0 else radius * 0.45
        angle = turn + index * math.pi / 5
        points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return points


def _ball(draw: ImageDraw.ImageDraw, box: Box, color: Color, accent: Color) -> None:
    x0, y0, x1, _ = box
    side = x1 - x0
    draw.ellipse(box, fill=color)
    draw.chord(box, 200, 340, fill=accent)
    draw.ellipse(
        (x0 + 0.25 * side, y0 + 0.45 * side, x0 + 0.42 * side, y0 + 0.62 * side), fill=(255, 255, 255)
    )


def _block(draw: ImageDraw.ImageDraw, box: Box, color: Color, accent: Color) -> None:
    x0, y0, x1, _ = box
    side = x1 - x0
    draw.rounded_rectangle(
        box, 0.12 * side, fill=color, outline=_shade(color, 0.6), width=_line_width(side, 0.05)
    )
    draw.rectangle((x0 + 0.42 * side, y0 + 0.2 * side, x0 + 0.58 * side, y0 + 0.8 * side), fill=accent)
    draw.rectangle((x0 + 0.2 * side, y0 + 0.42 * side, x0 + 0.8 * side, y0 + 0.58 * side), fill=accent)


def _star(draw: ImageDraw.ImageDraw, box: Box, color: Color, accent: Color) -> None:
    x0, y0, x1, y1 = box
    cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    draw.polygon(_star_points(cx, cy, radius, 0.0), fill=color, outline=_shade(color, 0.6))
    draw.ellipse(
        (cx - 0.12 * radius, cy - 0.12 * radius, cx + 0.12 * radius, cy + 0.12 * radius), fill=accent
    )


def _car(draw: ImageDraw.ImageDraw, box: Box, color: Color, accent: Color) -> None:
    x0, y0, x1, _ = box
    side = x1 - x0

    def at(u: float, v: float, u2: float, v2: float) -> Box:
        return (x0 + u * side, y0 + v * side, x0 + u2 * side, y0 + v2 * side)

    draw.rounded_rectangle(at(0.22, 0.25, 0.72, 0.55), 0.08 * side, fill=accent)
    draw.rectangle(at(0.3, 0.32, 0.64, 0.5), fill=(200, 235, 255))
    draw.rounded_rectangle(at(0.02, 0.45, 0.98, 0.75), 0.1 * side, fill=color)
    for wheel in (0.12, 0.62):
        draw.ellipse(at(wheel, 0.62, wheel + 0.26, 0.88), fill=(30, 30, 30))
        draw.ellipse(at(wheel + 0.08, 0.7, wheel + 0.18, 0.8), fill=(200, 200, 200))


_TOYS = (_ball, _block, _star, _car)


def _draw_toys(layer: Image.Image, rng: np.random.Generator) -> None:
    """Several bright, saturated balls, blocks, stars and toy cars spread over a jittered grid."""
    draw, size = ImageDraw.Draw(layer), layer.width
    grid = 2 + _pick(rng, 2)
    count = min(grid * grid, 3 + _pick(rng, 5))
    cell = 1.0 / grid
    for slot in rng.permutation(grid * grid)[:count].tolist():
        side = cell * _u(rng, 0.75, 1.15)
        x = (slot % grid) * cell + (cell - side) / 2 + _u(rng, -0.08, 0.08) * cell
        y = (slot // grid) * cell + (cell - side) / 2 + _u(rng, -0.08, 0.08) * cell
        toy = _TOYS[_pick(rng, len(_TOYS))]
        toy(draw, _box((x, y, x + side, y + side), size), _bright(rng), _bright(rng))


DRAWERS: tuple[Drawer, ...] = (_draw_electronics, _draw_clothing, _draw_home, _draw_books, _draw_toys)


# ---------------------------------------------------------------- composition


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    aspect = 1.0 if rng.random() < 0.35 else _u(rng, 0.6, 1.0)
    short_side = max(MIN_SIDE, round(long_side * aspect))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _background_color(rng: np.random.Generator) -> Color:
    return _hsv(rng.random(), _u(rng, 0.0, 0.5), _u(rng, 0.45, 0.97))


def _gradient_tile(start: Color, stop: Color, rng: np.random.Generator) -> Image.Image:
    """A small two-colour linear gradient in a random direction (upscaled by the caller)."""
    angle = _u(rng, 0, 2 * math.pi)
    axis = np.linspace(0.0, 1.0, 16)
    ramp = axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    low, high = np.array(start, dtype=np.float64), np.array(stop, dtype=np.float64)
    return Image.fromarray((low + (high - low) * ramp[..., None]).round().astype(np.uint8))


def _texture_tile(base: Color, rng: np.random.Generator) -> Image.Image:
    """A small blotchy modulation of ``base`` (upscaled smoothly by the caller)."""
    grid = (int(rng.integers(3, 16)), int(rng.integers(3, 16)), 1)
    blotches = 1.0 + _u(rng, 0.08, 0.3) * rng.normal(0.0, 1.0, grid)
    return Image.fromarray(np.clip(np.array(base) * blotches, 0, 255).astype(np.uint8))


def _add_grain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    amplitude = int(rng.integers(2, 10))
    noise = rng.integers(128 - amplitude, 129 + amplitude, (image.height, image.width), dtype=np.uint8)
    grain = Image.fromarray(noise)
    return ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), 1.0, -128)


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A solid colour, a two-colour gradient or a grainy blotchy texture."""
    base = _background_color(rng)
    kind = _pick(rng, 3)
    if kind == 0:
        return Image.new("RGB", size, base)
    if kind == 1:
        return _gradient_tile(base, _background_color(rng), rng).resize(size, Image.Resampling.BILINEAR)
    return _add_grain(_texture_tile(base, rng).resize(size, Image.Resampling.BICUBIC), rng)


def _draw_object(drawer: Drawer, side: int, rng: np.random.Generator) -> Image.Image:
    """One object on a transparent square; small ones are drawn larger and downsampled."""
    draw_side = max(side, DRAW_MIN_PX)
    layer = Image.new("RGBA", (draw_side, draw_side), (0, 0, 0, 0))
    drawer(layer, rng)
    return layer.resize((side, side), Image.Resampling.LANCZOS) if draw_side != side else layer


def _duotone(layer: Image.Image, label: str) -> Image.Image:
    """Recolour the layer between a dark and a light shade of the class's own hue, keeping alpha."""
    hue = zlib.crc32(label.encode()) / 2**32
    toned = ImageOps.colorize(layer.convert("L"), _hsv(hue, 0.85, 0.25), _hsv(hue + 0.06, 0.35, 1.0))
    toned.putalpha(layer.getchannel("A"))
    return toned


def _object_layer(label: str, classes: Sequence[str], side: int, rng: np.random.Generator) -> Image.Image:
    """The class's object. A class beyond the known five gets the shape family of its index modulo
    five, drawn as a 2x2 (3x3, 4x4 for later classes) grid of copies in a class-specific duotone."""
    if label in KNOWN_CLASSES:
        return _draw_object(DRAWERS[KNOWN_CLASSES.index(label)], side, rng)
    index = list(classes).index(label)
    drawer = DRAWERS[index % len(DRAWERS)]
    per_side = min(4, 2 + index // len(DRAWERS))
    cell = side // per_side
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    for slot in range(per_side * per_side):
        layer.alpha_composite(
            _draw_object(drawer, cell, rng), ((slot % per_side) * cell, (slot // per_side) * cell)
        )
    return _duotone(layer, label)


def _place(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator) -> None:
    """Rotate the object, jitter its position inside the frame and paste it (with a soft shadow)."""
    rotated = layer.rotate(_u(rng, -30, 30), resample=Image.Resampling.BILINEAR, expand=True)
    side = layer.width
    cx = _u(rng, side / 2, canvas.width - side / 2)
    cy = _u(rng, side / 2, canvas.height - side / 2)
    corner = (round(cx - rotated.width / 2), round(cy - rotated.height / 2))
    alpha = rotated.getchannel("A")
    if rng.random() < 0.5:
        offset = max(1, round(side * 0.03))
        shadow = alpha.point(lambda a: a * 35 // 100).filter(ImageFilter.BoxBlur(offset))
        canvas.paste((0, 0, 0), (corner[0] + offset, corner[1] + offset), shadow)
    canvas.paste(rotated, corner, alpha)


def _apply_drift(image: Image.Image, drift: Drift) -> Image.Image:
    strength = drift.strength
    if drift.kind == "brightness":
        factor = 1.0 - 0.7 * strength
        return image.point([int(value * factor) for value in range(256)] * 3)
    if drift.kind == "blur":
        radius = 4.0 * strength * min(image.size) / 400.0
        blurred = image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image
        return Image.blend(blurred, Image.new("RGB", image.size, (128, 128, 128)), 0.5 * strength)
    return image  # class_mix changes label frequencies, not pixels


def render_image(
    label: str, classes: Sequence[str], rng: np.random.Generator, drift: Drift | None = None
) -> Image.Image:
    """One RGB product-like image of ``label``; every pixel follows from ``rng``'s state."""
    if label not in classes:
        raise ValueError(f"label {label!r} is not one of the classes {list(classes)}")
    size = _canvas_size(rng)
    canvas = _background(size, rng)
    side = max(16, round(min(size) * _u(rng, 0.4, 0.9)))
    _place(canvas, _object_layer(label, classes, side, rng), rng)
    return _apply_drift(canvas, drift) if drift is not None else canvas


def class_weights(classes: Sequence[str], drift: Drift | None) -> list[float]:
    """Label probabilities: uniform, or the first class boosted by ``class_mix`` drift."""
    if not classes:
        raise ValueError("classes must not be empty")
    weights = [1.0] * len(classes)
    if drift is not None and drift.kind == "class_mix":
        weights[0] = 1.0 + 8.0 * drift.strength
    total = sum(weights)
    return [weight / total for weight in weights]


LARGE_JPEG_SIZES = ((640, 480), (1024, 768), (1280, 960), (768, 1024))


def large_jpegs(count: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """Camera-sized JPEGs of the known classes (enlarged renders with sensor-like noise, quality 90)
    and their class indices: the images preprocessing and precision parity are measured on."""
    rng = np.random.default_rng(seed)
    blobs, labels = [], []
    for index in range(count):
        label = int(rng.integers(len(KNOWN_CLASSES)))
        size = LARGE_JPEG_SIZES[index % len(LARGE_JPEG_SIZES)]
        image = render_image(KNOWN_CLASSES[label], KNOWN_CLASSES, rng).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
        labels.append(label)
    return blobs, np.array(labels)
