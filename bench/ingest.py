"""Benchmark: validated images per second, ``mlops`` ingestion vs a plain one-image-at-a-time PIL loop.

All contenders run in one process run, on the same landed day of ~500 px JPEGs (generated
deterministically with the demo generator), reading from the same local storage:

- plain PIL loop: open, decode, convert to RGB, size check, mean/std, sha256, save JPEG q95;
  serially, one image at a time (what a user writes first);
- mlops inspect, 1 process: our per-image checks (safety, normalisation, properties, pHash), read
  from the landed files and writing the curated bytes to files, as ingestion does from its spool;
- mlops inspect, N processes: the same across the cores (what ingestion uses);
- mlops ingest_day: the whole day end to end (GE suites, Data Docs, ledger, dedupe, splits,
  curated writes, catalog version).

Usage: python bench/ingest.py [--images 2000] [--side 500]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ml.config import load_settings
from ml.data.images import ImageLimits
from ml.data.ingest import ingest_day
from ml.data.inspection import inspect_files
from ml.demo.drawing import render_image
from ml.storage import LocalStorage

DAY = dt.date(2026, 3, 1)
RESULTS = Path(__file__).resolve().parent / "results"


def land_jpegs(storage: LocalStorage, count: int, side: int, classes: list[str]) -> dict[str, bytes]:
    rng = np.random.default_rng(2026)
    blobs: dict[str, bytes] = {}
    rows = []
    for index in range(count):
        label = classes[index % len(classes)]
        image = render_image(label, classes, rng)
        scale = side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        name = f"img_{index:05d}.jpg"
        storage.write_bytes(f"landing/{DAY}/images/{name}", buffer.getvalue())
        blobs[name] = buffer.getvalue()
        rows.append(f"{name},{label}")
    storage.write_bytes(f"landing/{DAY}/labels.csv", ("filename,label\n" + "\n".join(rows) + "\n").encode())
    return blobs


def plain_loop(storage: LocalStorage, names: list[str], out_dir: Path, min_side: int, max_side: int) -> int:
    accepted = 0
    for name in names:
        data = storage.read_bytes(f"landing/{DAY}/images/{name}")
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except OSError:
            continue
        if not (min_side <= min(image.size) and max(image.size) <= max_side):
            continue
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        if grey.std() < 3 or not 3 <= grey.mean() <= 252:
            continue
        digest = hashlib.sha256(data).hexdigest()
        image.save(out_dir / f"{digest}.jpg", format="JPEG", quality=95)
        accepted += 1
    return accepted


def accepted(results: dict) -> int:
    return sum(result.report.reason is None for result in results.values())


def timed(label: str, count: int, fn) -> dict[str, float | str]:
    started = time.perf_counter()
    cpu_started = time.process_time()
    value = fn()
    seconds = time.perf_counter() - started
    row = {
        "contender": label,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "parent_cpu_s": round(time.process_time() - cpu_started, 2),
        "accepted": value,
    }
    print(f"  {label:<34} {seconds:7.2f} s  {count / seconds:7.1f} img/s  (accepted {value})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=500)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = load_settings(environ={"MLOPS__INGEST__WORKERS": str(cores)})
    limits = ImageLimits.from_settings(settings.ingest)
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        storage = LocalStorage(Path(tmp) / "store")
        started = time.perf_counter()
        blobs = land_jpegs(storage, args.images, args.side, settings.classes)
        mean_kb = sum(map(len, blobs.values())) / len(blobs) / 1024
        print(
            f"landed {len(blobs)} JPEGs, longest side {args.side} px, mean {mean_kb:.0f} KiB "
            f"({time.perf_counter() - started:.0f} s to generate); {cores} cores\n"
        )
        plain_out = Path(tmp) / "plain"
        plain_out.mkdir()
        names = sorted(blobs)
        paths = {n: storage.root / f"landing/{DAY}/images/{n}" for n in names}
        curated_out = Path(tmp) / "curated"
        curated_out.mkdir()
        rows = [
            timed(
                "plain PIL loop (1 image at a time)",
                len(names),
                lambda: plain_loop(
                    storage, names, plain_out, settings.ingest.min_side_px, settings.ingest.max_side_px
                ),
            ),
            timed(
                "mlops inspect, 1 process",
                len(names),
                lambda: accepted(inspect_files(paths, limits, 1, curated_out)),
            ),
            timed(
                f"mlops inspect, {cores} processes",
                len(names),
                lambda: accepted(inspect_files(paths, limits, cores, curated_out)),
            ),
            timed(
                "mlops ingest_day (end to end)",
                len(names),
                lambda: ingest_day(settings, storage, DAY).curated.files,
            ),
        ]
    write_report(
        rows, {"images": args.images, "side_px": args.side, "mean_kib": round(mean_kb, 1), "cores": cores}
    )


def write_report(rows: list[dict], header: dict[str, object]) -> None:
    """``bench/results/ingest.json`` and the README table."""
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["vs_plain"] = round(float(row["images_per_s"]) / float(baseline), 2)
    report = {**header, "python": platform.python_version(), "pillow": Image.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(report, indent=2))
    print("\n| contender | seconds | images/s | vs plain |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['contender']} | {row['seconds']} | {row['images_per_s']} | {row['vs_plain']}x |")


if __name__ == "__main__":
    main()
