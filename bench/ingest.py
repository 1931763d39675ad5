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

From the same run it prints the ceiling of ``ingest_day`` against the plain loop on these cores: the
one-process inspection's time plus the day's CPU outside it (the parent's), spread over the cores with
none idle, against the loop's time.

Usage: python bench/ingest.py [--images 2000] [--side 500] [--landed FOLDER] [--rounds 1]

Generating the day takes ~150 s for 10,000 images on 2 cores; with ``--landed FOLDER`` the day is
generated into ``FOLDER/<images>x<side>-<classes>`` the first time and copied from there by each later
run (the same bytes: the generator is seeded). With ``--rounds N`` the run is repeated N times, each
round in a process of its own on a fresh copy of the day (after an untimed 20-image run that compiles
what they import), and the medians close it: on a host whose
speed drifts within minutes, a contender's ratio to the plain loop of its own round moves less than its
seconds do.

With ``--workers 1,2`` it measures the production profile instead (``make up PROFILE=production``
first): landed days of the same size and kind (fresh dates, each its own images: a repeated image would
be deduplicated, not curated), each ingested by the ``ingest_daily`` DAG with its objects
split into 1, then 2 shards, each shard a mapped task on its own Celery worker; wall time of the run,
of the fan-out (first shard start to last shard end) and which worker ran what. The DAGs that react
to an ingest are paused meanwhile, so nothing else competes for the workers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


def land_jpegs(
    storage: LocalStorage, count: int, side: int, classes: list[str], seed: int = 2026
) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
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


def landed_day(
    storage: LocalStorage, count: int, side: int, classes: list[str], cache: Path | None
) -> dict[str, int]:
    """The day's JPEGs landed in ``storage`` (name: bytes): generated, or copied from ``cache`` (generated
    there first)."""
    if cache is None:
        return {name: len(data) for name, data in land_jpegs(storage, count, side, classes).items()}
    classes_tag = hashlib.sha256(",".join(classes).encode()).hexdigest()[:8]  # other classes, other images
    folder = cache / f"{count}x{side}-{classes_tag}"
    landing = f"landing/{DAY}"
    if not (folder / landing / "labels.csv").exists():
        # made aside and renamed into place: a run never sees, nor removes, another run's half-made day
        cache.mkdir(parents=True, exist_ok=True)
        remove_orphaned_days(cache)
        made = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{os.getpid()}-", dir=cache))
        try:
            land_jpegs(LocalStorage(made), count, side, classes)
        except BaseException:  # an interrupted run (Ctrl-C, an error) leaves no half-made day behind
            shutil.rmtree(made, ignore_errors=True)
            raise
        try:
            made.rename(folder)
        except OSError:  # another run's day got there first; or an unfinished one (no labels.csv) is there
            if (folder / landing / "labels.csv").exists():
                shutil.rmtree(made)
            else:
                shutil.rmtree(folder)
                made.rename(folder)
    shutil.copytree(folder / landing, storage.root / landing)
    images = storage.root / landing / "images"
    return {path.name: path.stat().st_size for path in sorted(images.iterdir())}


def remove_orphaned_days(cache: Path) -> list[Path]:
    """Remove the half-made days of runs that are gone (a SIGKILL skips their own cleanup); a running
    generation's folder, named with its process id, is left alone. Returns what was removed."""
    removed = []
    for made in cache.glob(".*-*-*"):
        pid = made.name.rsplit("-", 2)[1]
        if made.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(made, ignore_errors=True)
            removed.append(made)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


def file_creation_ms(folder: Path, count: int = 300) -> float:
    """Milliseconds to create one empty file in ``folder`` now. On this VM's ext4 without a journal an
    inode freed in the last 60-360 s is passed over, and looked up, by every allocation: ~0.02 ms in a
    quiet state, up to ~0.7 ms within minutes of a large delete (a bench run before this one), which
    every contender that writes files pays."""
    folder.mkdir()
    started = time.perf_counter()
    for index in range(count):
        (folder / str(index)).touch()
    return (time.perf_counter() - started) / count * 1000


def accepted(results: dict) -> int:
    return sum(result.report.reason is None for result in results.values())


def timed(label: str, count: int, fn) -> dict[str, float | str]:
    os.sync()  # each contender starts with no dirty pages of the one before being written back
    started = time.perf_counter()
    cpu_started = time.process_time()
    workers_started = sum(os.times()[2:4])  # the CPU of finished child processes: the inspection's
    value = fn()
    seconds = time.perf_counter() - started
    row = {
        "contender": label,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "parent_cpu_s": round(time.process_time() - cpu_started, 2),
        "workers_cpu_s": round(sum(os.times()[2:4]) - workers_started, 2),
        "accepted": value,
    }
    print(f"  {label:<34} {seconds:7.2f} s  {count / seconds:7.1f} img/s  (accepted {value})", flush=True)
    return row


def one_round(
    settings: Any, cores: int, args: argparse.Namespace, cache: Path | None
) -> tuple[list[dict], dict[str, Any]]:
    """Every contender once, on the day landed afresh in a store of its own: its rows and header."""
    limits = ImageLimits.from_settings(settings.ingest)
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        storage = LocalStorage(Path(tmp) / "store")
        started = time.perf_counter()
        sizes = landed_day(storage, args.images, args.side, settings.classes, cache)
        mean_kb = sum(sizes.values()) / len(sizes) / 1024
        print(
            f"landed {len(sizes)} JPEGs, longest side {args.side} px, mean {mean_kb:.0f} KiB "
            f"({time.perf_counter() - started:.0f} s to land); {cores} cores\n"
        )
        plain_out = Path(tmp) / "plain"
        plain_out.mkdir()
        names = sorted(sizes)
        paths = {n: storage.root / f"landing/{DAY}/images/{n}" for n in names}
        curated_out = Path(tmp) / "curated"
        curated_out.mkdir()
        creation = {"start": file_creation_ms(Path(tmp) / "probe-start")}
        print(f"  creating a file here: {creation['start']:.3f} ms", flush=True)
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
        ]
        creation["before_the_day"] = file_creation_ms(Path(tmp) / "probe-day")
        print(f"  creating a file here: {creation['before_the_day']:.3f} ms", flush=True)
        rows.append(
            timed(
                "mlops ingest_day (end to end)",
                len(names),
                lambda: ingest_day(settings, storage, DAY).curated.files,
            )
        )
    header = {"images": args.images, "side_px": args.side, "mean_kib": round(mean_kb, 1), "cores": cores}
    return rows, {**header, "file_creation_ms": {k: round(v, 3) for k, v in creation.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=500)
    parser.add_argument("--workers", help="e.g. 1,2: shards over the production profile's workers")
    parser.add_argument("--landed", type=Path, help="a folder keeping generated days for later runs")
    parser.add_argument("--rounds", type=int, default=1, help="runs, each in a new process")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds takes 1 or more")
    if args.workers:
        production_bench([int(n) for n in args.workers.split(",")], args.images, args.side)
        return
    if args.rounds == 1:
        cores = len(os.sched_getaffinity(0))
        settings = load_settings(environ={"MLOPS__INGEST__WORKERS": str(cores)})
        write_report(*one_round(settings, cores, args, args.landed))
        return
    rounds = []

    def run_alone(images: int, *extra: str) -> None:
        """One run in a process of its own, as each ingest task is: it pays the imports (GE's ~2.5 s)."""
        argv = [sys.executable, __file__, "--images", str(images), "--side", str(args.side), *extra]
        subprocess.run(argv, check=True)

    # untimed: a fresh clone's first process compiles the bytecode of all it imports (~2 s of the
    # parent's CPU), which would make the first round unlike the others
    print("\n## warm-up (untimed: compiles what the rounds import)\n", flush=True)
    run_alone(20)
    with tempfile.TemporaryDirectory(prefix="mlops-bench-landed-") as scratch:
        landed = args.landed or Path(scratch)  # generated once, not per round
        for number in range(1, args.rounds + 1):
            print(f"\n## round {number} of {args.rounds}\n", flush=True)
            run_alone(args.images, "--landed", str(landed))
            rounds.append(json.loads((RESULTS / "ingest.json").read_text())["rows"])
    summarise_rounds(rounds, args.images)


def summarise_rounds(rounds: list[list[dict]], images: int) -> None:
    """The median of each contender's seconds and of its ratio to the plain loop of the same round: a
    host whose speed drifts within minutes moves both contenders of a round alike."""
    print(f"\n## median of {len(rounds)} rounds\n")
    print(
        "| contender | seconds | images/s | vs plain (each round) | vs plain, median |\n"
        "|---|---:|---:|---|---:|"
    )
    medians = []
    for index, first in enumerate(rounds[0]):
        seconds = statistics.median(rows[index]["seconds"] for rows in rounds)
        ratios = [rows[index]["vs_plain"] for rows in rounds]
        medians.append(
            {"contender": first["contender"], "seconds": seconds, "vs_plain": statistics.median(ratios)}
        )
        shown = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
        print(
            f"| {first['contender']} | {seconds:.2f} | {images / seconds:.1f} | {shown} "
            f"| {medians[-1]['vs_plain']:.2f}x |"
        )
    summary = {"images": images, "medians": medians, "rounds": rounds}
    (RESULTS / "ingest_rounds.json").write_text(json.dumps(summary, indent=2))


def ceiling_vs_plain(plain_s: float, one_process_s: float, day_parent_cpu_s: float, cores: int) -> float:
    """The most ``ingest_day`` can be against the plain loop on ``cores``: the inspection's CPU (one
    process's time) and the day's own CPU besides it (the parent's: GE, suites, publishing), spread
    over the cores with nothing idle, against the loop's time."""
    return cores * plain_s / (one_process_s + day_parent_cpu_s)


def write_report(rows: list[dict], header: dict[str, Any]) -> None:
    """``bench/results/ingest.json`` and the README table."""
    baseline = rows[0]["images_per_s"]
    for row in rows:
        row["vs_plain"] = round(float(row["images_per_s"]) / float(baseline), 2)
    plain, one_process, day = rows[0], rows[1], rows[-1]
    cores = header["cores"]
    ceiling = ceiling_vs_plain(plain["seconds"], one_process["seconds"], day["parent_cpu_s"], cores)
    day_ceiling = ceiling_vs_plain(plain["seconds"], day["workers_cpu_s"], day["parent_cpu_s"], cores)
    report = {
        **header,
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "rows": rows,
        "ingest_day_ceiling_vs_plain": round(ceiling, 2),
        "ingest_day_ceiling_vs_plain_with_its_own_cpu": round(day_ceiling, 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(report, indent=2))
    print("\n| contender | seconds | images/s | vs plain |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['contender']} | {row['seconds']} | {row['images_per_s']} | {row['vs_plain']}x |")
    print(
        f"\nCeiling of ingest_day on {cores} cores: {ceiling:.2f}x the plain loop (the one-process "
        f"inspection's {one_process['seconds']} s plus the day's other CPU, {day['parent_cpu_s']} s in the "
        f"parent, spread over the cores with nothing idle, against the loop's {plain['seconds']} s)"
    )
    print(
        f"The day's own CPU: {day['workers_cpu_s']} s in its inspection workers (the one-process "
        f"inspection's CPU: {one_process['workers_cpu_s']} s) and {day['parent_cpu_s']} s in the parent: "
        f"at most {day_ceiling:.2f}x the loop with that CPU spread over the cores"
    )


REACTING_DAGS = ("drift_monitor", "retrain", "monitor_serving", "tune")


def production_bench(workers: list[int], images: int, side: int) -> None:
    """The same day ingested by the production profile's DAG over ``n`` shards for each ``n``."""
    from ml.ops import production, stack
    from ml.storage import storage_from_settings

    settings = production.use_profile()
    storage = storage_from_settings(settings)
    try:
        api = stack.Api.as_admin()
    except OSError as exc:
        raise SystemExit(f"the production profile is not up ({exc}): make up PROFILE=production") from exc
    landed = sorted({key.split("/")[1] for key in storage.list("landing") if key.count("/") >= 2})
    first = max([dt.date.fromisoformat(day) for day in landed] + [dt.date(2030, 1, 1)])
    days = [first + dt.timedelta(days=1 + index) for index in range(len(workers))]
    for day in days:  # days of one kind, each its own images (dedupe would skip repeated ones)
        blobs = generated_day(images, side, settings.classes, seed=day.toordinal())
        for name, (data, _) in blobs.items():
            storage.write_bytes(f"landing/{day}/images/{name}", data)
        labels = "filename,label\n" + "".join(f"{name},{label}\n" for name, (_, label) in blobs.items())
        storage.write_bytes(f"landing/{day}/labels.csv", labels.encode())
    print(f"landed {images} JPEGs ({side} px) on {', '.join(map(str, days))} in {settings.storage.root}")
    limit = endpoint_limit(storage, storage.list(f"landing/{days[0]}/images")[:1000])
    paused = {dag: api.call(f"/api/v2/dags/{dag}")["is_paused"] for dag in REACTING_DAGS}
    for dag in REACTING_DAGS:
        api.call(f"/api/v2/dags/{dag}", {"is_paused": True}, method="PATCH")
    rows = []
    try:
        for shards, day in zip(workers, days, strict=True):
            with CpuSampler() as cpu:
                run_id = api.trigger("ingest_daily", {"date": str(day), "shards": shards})
                state = api.wait("ingest_daily", run_id)
            if state != "success":
                raise SystemExit(f"ingest_daily {run_id} ended {state}")
            rows.append(run_row(api, run_id, shards, images, cpu))
    finally:
        for dag, was_paused in paused.items():
            api.call(f"/api/v2/dags/{dag}", {"is_paused": was_paused}, method="PATCH")
    base = rows[0]
    for row in rows:
        row["speedup_run"] = round(base["run_seconds"] / row["run_seconds"], 2)
        row["speedup_fan_out"] = round(base["fan_out_seconds"] / row["fan_out_seconds"], 2)
    RESULTS.mkdir(exist_ok=True)
    report = {
        "images": images,
        "side_px": side,
        "cores": len(os.sched_getaffinity(0)),
        "s3_endpoint_requests_per_s": limit,
        "rows": rows,
    }
    (RESULTS / "ingest_workers.json").write_text(json.dumps(report, indent=2))
    print(
        "\n| shards (workers) | run s | run img/s | speed-up | fan-out s | fan-out img/s | speed-up | "
        "merge s | CPU busy in fan-out (moto) | workers used |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for row in rows:
        print(
            f"| {row['shards']} | {row['run_seconds']} | {row['run_images_per_s']} | {row['speedup_run']}x | "
            f"{row['fan_out_seconds']} | {row['fan_out_images_per_s']} | {row['speedup_fan_out']}x | "
            f"{row['merge_seconds']} | {row['fan_out_cpu_busy_percent']}% "
            f"({row['fan_out_moto_cpu_percent']}%) | {', '.join(row['hosts'])} |"
        )


def generated_day(images: int, side: int, classes: list[str], seed: int) -> dict[str, tuple[bytes, str]]:
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        storage = LocalStorage(Path(tmp))
        blobs = land_jpegs(storage, images, side, classes, seed)
    return {
        name: (data, classes[index % len(classes)])
        for index, (name, data) in enumerate(sorted(blobs.items()))
    }


class CpuSampler:
    """The machine's busy share and moto_server's, sampled every half second while a run goes on."""

    def __init__(self) -> None:
        import psutil

        self.samples: list[tuple[float, float, float]] = []  # (unix time, machine %, moto_server %)
        self._stop = threading.Event()
        self._moto = [
            p for p in psutil.process_iter(["cmdline"]) if "moto_server" in " ".join(p.info["cmdline"] or [])
        ]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        psutil.cpu_percent()
        for process in self._moto:
            process.cpu_percent()
        while not self._stop.wait(0.5):
            moto = sum(process.cpu_percent() for process in self._moto if process.is_running())
            self.samples.append((time.time(), psutil.cpu_percent(), moto / psutil.cpu_count()))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: dt.datetime, end: dt.datetime) -> tuple[float, float]:
        """(machine busy %, moto_server %) averaged over [start, end] (both as shares of all cores)."""
        window = [s for s in self.samples if start.timestamp() <= s[0] <= end.timestamp()]
        if not window:
            return float("nan"), float("nan")
        return round(sum(s[1] for s in window) / len(window), 1), round(
            sum(s[2] for s in window) / len(window), 1
        )


def endpoint_limit(storage: object, keys: list[str]) -> dict[str, float]:
    """Requests per second the S3 endpoint answers (GET of landed images, PUT of copies) with 1 and
    16 client threads: the ceiling every shard's downloads and staged writes share."""
    from concurrent.futures import ThreadPoolExecutor

    blobs = {key: storage.read_bytes(key) for key in keys}
    found = {}
    for threads in (1, 16):
        for verb, call in (
            ("GET", lambda key: storage.read_bytes(key)),
            ("PUT", lambda key: storage.write_bytes(f"bench-scratch/{key}", blobs[key])),
        ):
            started = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(call, keys))
            found[f"{verb} x{threads}"] = round(len(keys) / (time.perf_counter() - started), 1)
    storage.delete_many([f"bench-scratch/{key}" for key in keys])
    print(f"S3 endpoint, requests/s: {found}", flush=True)
    return found


def run_row(
    api: object, run_id: str, shards: int, images: int, cpu: CpuSampler | None = None
) -> dict[str, object]:
    """Wall time of the run and of its fan-out, from the task instances' own start and end times."""
    run = api.call(f"/api/v2/dags/ingest_daily/dagRuns/{run_id}")
    tis = api.call(f"/api/v2/dags/ingest_daily/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
    when = dt.datetime.fromisoformat
    shard_tis = [ti for ti in tis if ti["task_id"] == "inspect_shard"]
    merge = [ti for ti in tis if ti["task_id"] == "ingest"]
    run_seconds = (when(run["end_date"]) - when(run["start_date"])).total_seconds()
    fan_out = (
        max(when(ti["end_date"]) for ti in shard_tis) - min(when(ti["start_date"]) for ti in shard_tis)
    ).total_seconds()
    first_start = min(when(ti["start_date"]) for ti in shard_tis)
    last_end = max(when(ti["end_date"]) for ti in shard_tis)
    busy, moto = cpu.mean(first_start, last_end) if cpu else (float("nan"), float("nan"))
    print(
        f"  {shards} shard(s): run {run_seconds:.1f} s, fan-out {fan_out:.1f} s "
        f"(CPU busy {busy}% of both cores, moto_server {moto}%)",
        flush=True,
    )
    return {
        "fan_out_cpu_busy_percent": busy,
        "fan_out_moto_cpu_percent": moto,
        "shards": shards,
        "run_id": run_id,
        "run_seconds": round(run_seconds, 1),
        "run_images_per_s": round(images / run_seconds, 1),
        "fan_out_seconds": round(fan_out, 1),
        "fan_out_images_per_s": round(images / fan_out, 1),
        "merge_seconds": round(sum(ti["duration"] or 0 for ti in merge), 1),
        "hosts": sorted({ti["hostname"] for ti in shard_tis}),
        "shard_seconds": [round(ti["duration"] or 0, 1) for ti in shard_tis],
    }


if __name__ == "__main__":
    main()
