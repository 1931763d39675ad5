"""Personal data in what upstream sends besides the images: detected and masked before it is kept.

A labels.csv row's extra columns become the catalog's ``metadata`` (shown by lineage, the page and
the model card). Values are searched for email addresses, phone numbers (international ``+``
numbers, and North American ones with separators), payment card numbers (13-19 digits that pass the
Luhn check) and IPv4 addresses; each match becomes ``[<kind> removed]``. Upstream's landed
labels.csv is left as it landed: masking applies to what this system keeps. Dates, plain numeric
ids and version strings with fewer than four parts are not matched.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
PHONE = re.compile(
    r"(?<![\w+])\+(?:\d[\s().-]?){7,14}\d(?!\w)"  # +44 20 7946 0958, +1-202-555-0143
    r"|(?<![\w(])\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}(?!\w)"  # (202) 555-0143, 202.555.0143
)
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.])")
KINDS = ("email", "card", "phone", "ip")


def mask_token(kind: str) -> str:
    return f"[{kind} removed]"


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _mask_cards(text: str, found: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            found["card"] += 1
            return mask_token("card")
        return match.group()

    return CARD.sub(replace, text)


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every email, card number, phone number and IPv4 address masked; counts by kind."""
    found: Counter[str] = Counter()
    for kind, pattern in (("email", EMAIL), ("card", None), ("phone", PHONE), ("ip", IPV4)):
        if pattern is None:
            text = _mask_cards(text, found)
            continue
        text, count = pattern.subn(mask_token(kind), text)
        if count:
            found[kind] += count
    return text, found


def masked_counts(texts: Iterable[str]) -> dict[str, int]:
    """How many masks ``texts`` hold, by kind (only kinds found)."""
    found: Counter[str] = Counter()
    for text in texts:
        for kind in KINDS:
            found[kind] += text.count(mask_token(kind))
    return {kind: found[kind] for kind in KINDS if found[kind]}
