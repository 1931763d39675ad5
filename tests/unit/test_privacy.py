"""Personal data in upstream's metadata: what is masked, what is left, and what ingestion keeps."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ml.data import catalog
from ml.data.ingest import ingest_day
from ml.data.privacy import luhn_valid, mask_pii, masked_counts
from ml.storage import LocalStorage
from tests.hostile import encode, photo

DAY = dt.date(2026, 4, 2)


@pytest.mark.parametrize(
    ("text", "masked", "kind"),
    [
        ("mail jane.doe+shop@example.co.uk today", "mail [email removed] today", "email"),
        ("+44 20 7946 0958", "[phone removed]", "phone"),
        ("call (202) 555-0143 or 202.555.0144", "call [phone removed] or [phone removed]", "phone"),
        ("paid with 4111 1111 1111 1111", "paid with [card removed]", "card"),
        ("4242-4242-4242-4242", "[card removed]", "card"),
        ("uploaded from 192.168.1.20", "uploaded from [ip removed]", "ip"),
    ],
)
def test_personal_data_is_masked_by_kind(text: str, masked: str, kind: str) -> None:
    found, counts = mask_pii(text)
    assert found == masked and set(counts) == {kind}


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-05",
        "2026-01-05T12:00:00+00:00",
        "sku 123456789",
        "4111111111111112",  # fails the Luhn check: an id, not a card
        "req-123456789012",
        "v1.2.3",
        "1733600000",
        "studio",
        "3f2a9c1e-7b1d-4c1e-9a4b-123456789012",
    ],
)
def test_dates_ids_and_versions_are_left_as_they_are(text: str) -> None:
    assert mask_pii(text) == (text, {})


def test_the_luhn_check_and_the_counts() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    texts = [mask_pii("a@b.io, c@d.io")[0], mask_pii("+1 202 555 0143")[0], "plain"]
    assert masked_counts(texts) == {"email": 2, "phone": 1}


@pytest.mark.parametrize("mask", [True, False])
def test_ingestion_keeps_metadata_masked_and_leaves_the_landed_file_as_it_landed(
    tmp_path: Path, make_settings, mask: bool
) -> None:
    storage = LocalStorage(tmp_path / "store")
    rows = [
        ("a.png", "books", "studio", "jane@example.com"),
        ("b.png", "toys", "phone", "+49 30 901820"),
        ("c.png", "books", "studio", ""),
    ]
    for index, (name, *_rest) in enumerate(rows):
        storage.write_bytes(f"landing/{DAY}/images/{name}", encode(photo(index), "PNG"))
    labels = "filename,label,source,uploader\n" + "".join(f"{n},{lab},{s},{u}\n" for n, lab, s, u in rows)
    storage.write_bytes(f"landing/{DAY}/labels.csv", labels.encode())

    result = ingest_day(make_settings(ingest__mask_pii=mask), storage, DAY).to_dict()

    kept = {
        row["source_key"].rsplit("/", 1)[-1]: json.loads(row["metadata"])
        for row in catalog.read_partition(storage, DAY).to_dict("records")
    }
    assert kept["c.png"] == {"source": "studio"}
    if mask:
        assert kept["a.png"] == {"source": "studio", "uploader": "[email removed]"}
        assert kept["b.png"] == {"source": "phone", "uploader": "[phone removed]"}
        assert result["pii_masked"] == {"email": 1, "phone": 1}
    else:
        assert kept["a.png"]["uploader"] == "jane@example.com" and result["pii_masked"] == {}
    assert storage.read_bytes(f"landing/{DAY}/labels.csv") == labels.encode()  # upstream's file, untouched
