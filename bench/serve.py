"""Benchmark: the prediction service vs the plain FastAPI + eager PyTorch server, same model, one run.

A model is trained on generated demo days (or an existing registry is used with --tracking-uri and
--storage). Each server runs alone on this machine while Debian's ``wrk`` (a C load generator,
1 thread) posts the same multipart JPEG at concurrency 1, 4, 8 and 32:

- mlops: ``bentoml serve bentos.service:ImageClassifier`` as ``mlops serve`` runs it (ONNX
  Runtime, adaptive batching, auth on, prediction log on, ``serving.workers`` processes);
- plain: ``bench/plain_server.py``, the spec's serving.py (FastAPI + uvicorn, eager torch, one
  image per request, torchvision transforms), loading the same registered version from MLflow.

Reported per server and concurrency: requests/s, p50/p90/p99 latency, non-2xx and socket errors,
and the peak resident memory of the server's whole process tree (for mlops also the mean images
per model call at each level, from its batch-size histogram). Beside them, measured in the same
run: the model-only bound (the served bundle through ONNX Runtime in process, no HTTP and no decode,
the best of 2 processes x 1 thread, 1 process x 2 threads, batch 1 or 8), each concurrency's share of
it, and the median time of each in-service stage of one request (multipart check, decode, image
properties, resize and normalise, the model, JSON).

With ``--rounds N`` the bound, mlops and plain are measured N times on the one trained world, and
the median of each concurrency's figures is printed (each round's share and ratio against its own
bound and plain server): the host's speed drifts by the minute, and the plain server's most.

Usage: python bench/serve.py [--duration 20] [--workers N] [--precision int8] [--rounds N] [--keep-world]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"
START = dt.date(2026, 9, 1)
KEY = "bench-key-0123456789abcdef0123456789abcdef"  # keys are at least 32 characters
CONCURRENCY = (1, 4, 8, 32)


@contextlib.contextmanager
def world_folder(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A new folder for a benchmark's world (store, registry, BentoML home, server logs): removed when
    the block ends well unless ``keep``; on a failure kept, and its path printed, for the logs."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    except BaseException:
        print(f"the world and the server logs are kept in {folder}", file=sys.stderr, flush=True)
        raise
    if keep:
        print(f"the world and the server logs are in {folder}", flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def make_world(tmp: Path, precision: str = "fp32") -> dict[str, str]:
    """Three generated demo days, ingested; v1 trained and promoted. Returns the settings environment."""
    from ml import registry
    from ml.config import load_settings
    from ml.data.ingest import ingest_day
    from ml.demo.landing import land_days
    from ml.storage import LocalStorage
    from ml.training.pipeline import retrain

    env = {
        "MLOPS__PREPROCESSING__JPEG_DRAFT": "true",  # preprocessing v2: what this benchmark measures
        "MLOPS__STORAGE__ROOT": str(tmp / "store"),
        "MLOPS__MLFLOW__TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MLOPS__SERVING__STATE_DIR": str(tmp / "serving"),
        "MLOPS__MODEL__PRECISION": precision,  # int8: the served graph is the quantised backbone + head
    }
    settings = load_settings(environ=env)
    storage = LocalStorage(tmp / "store")
    land_days(storage, START, 3, settings.classes, count=120, seed=11)
    for offset in range(3):
        ingest_day(settings, storage, START + dt.timedelta(days=offset))
    trained = retrain(settings, storage, overrides={"epochs": 15}).to_dict()
    registry.promote(settings, storage, trained["model_version"], "bench")
    return env


def request_image() -> bytes:
    """A 640x480 product-like photo as JPEG (quality 90): what a client typically uploads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    base = (np.sin(xx / 23) + np.cos(yy / 17)) * 60 + 128
    rgb = np.stack([base + rng.normal(0, 12, base.shape) + 20 * c for c in range(3)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class PeakRss:
    """Samples the resident memory of a process and its children every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self.peak_worker = psutil.Process(pid), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                sizes = [p.memory_info().rss for p in tree if p.is_running()]
                self.peak = max(self.peak, sum(sizes))
                self.peak_worker = max(self.peak_worker, max(sizes, default=0))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wrk(
    url: str, body_file: Path, content_type: str, auth: str, concurrency: int, seconds: int
) -> dict[str, Any]:
    env = {**os.environ, "BODY_FILE": str(body_file), "CONTENT_TYPE": content_type, "AUTH": auth}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA), url],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    found = dict(re.findall(r"(\w+)=(\d+)", out.split("RESULT", 1)[1]))
    seconds_run = int(found["duration_us"]) / 1e6
    return {
        "concurrency": concurrency,
        "requests": int(found["requests"]),
        "rps": round(int(found["requests"]) / seconds_run, 1),
        "p50_ms": round(int(found["p50_us"]) / 1000, 1),
        "p90_ms": round(int(found["p90_us"]) / 1000, 1),
        "p99_ms": round(int(found["p99_us"]) / 1000, 1),
        "non_2xx": int(found["non2xx"]),
        "socket_errors": int(found["errors_socket"]),
    }


def _infer_loop(folder: str, array: Any, batch: int, threads: int, seconds: float, out: Any) -> None:
    """One process: ``threads`` threads calling the served bundle on ``batch`` copies of ``array``."""
    import numpy as np

    from ml.serving.bundle import ServingModel

    model = ServingModel(Path(folder), threads=1)
    inputs = np.stack([array] * batch)
    model.infer(inputs)  # warm-up
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def spin(index: int) -> None:
        while time.perf_counter() < deadline:
            model.infer(inputs)
            counts[index] += batch

    pool = [threading.Thread(target=spin, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put(sum(counts))


def model_only_bound(folder: Path, array: Any, seconds: float = 8.0) -> dict[str, Any]:
    """The served bundle through ONNX Runtime in process (no HTTP, no decode): img/s per layout, best."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    layouts = {}
    for processes, threads, batch in ((2, 1, 1), (1, 2, 1), (2, 1, 8), (1, 1, 1)):
        queue = context.Queue()
        workers = [
            context.Process(target=_infer_loop, args=(str(folder), array, batch, threads, seconds, queue))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        done = sum(queue.get() for _ in workers)
        for worker in workers:
            worker.join()
        layouts[f"{processes} proc x {threads} thread, batch {batch}"] = round(done / seconds, 1)
        print("model only", layouts, flush=True)
    best = max(layouts, key=lambda name: layouts[name])
    return {"layouts": layouts, "best": best, "img_s": layouts[best]}


def stage_profile(
    folder: Path, body: bytes, content_type: str, data: bytes, reps: int = 300
) -> dict[str, float]:
    """Median ms per request of each in-service stage, one thread, on the benchmark's request."""
    import statistics

    from ml.config import load_settings
    from ml.data.images import ImageLimits, open_checked, pixel_statistics
    from ml.serving.bundle import ServingModel
    from ml.serving.uploads import checked_body
    from ml.training.preprocessing import to_array

    model = ServingModel(folder, threads=1)
    limits = ImageLimits.from_settings(load_settings().ingest)
    draft = model.prep.draft_side()  # the bundle's preprocessing: v2 decodes large JPEGs drafted
    _, rgb, props = open_checked(data, limits, draft)
    full_size = (props["upright_width"], props["upright_height"])
    array = to_array(rgb, model.prep)
    answer = model.answer(model.infer(array[None]).proba[0])
    stages = {
        "multipart check + parse (guard)": lambda: checked_body("/predict", body, content_type),
        f"decode + checks (open_checked, 1/{props['draft_scale']} scale)": lambda: open_checked(
            data, limits, draft
        ),
        "image properties (drift)": lambda: pixel_statistics(
            rgb, phash=False, scale=props["draft_scale"], full_size=full_size
        ),
        "resize + normalise (to_array)": lambda: to_array(rgb, model.prep),
        "model, batch 1 (ONNX Runtime)": lambda: model.infer(array[None]),
        "answer as JSON": lambda: json.dumps(answer),
    }
    found = {}
    for name, step in stages.items():  # each stage alone: what it costs one request on one core
        step()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        found[name] = round(statistics.median(times) * 1000, 3)
    return found


@contextlib.contextmanager
def served(command: list[str], env: dict[str, str], health: str, log: Path) -> Iterator[subprocess.Popen]:
    """A server started from ``command`` (output appended to ``log``), ready on ``health``; stopped after."""
    from ml.http import wait_ready
    from ml.release.service import stop_service

    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(health, process, 180, path="")
        yield process
    finally:
        stop_service(process)


def model_calls(metrics: str) -> tuple[float, float]:
    """(model calls, images in them) so far, over every worker and version, from the service's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from ml.http import http

    totals = {"mlops_model_batch_images_count": 0.0, "mlops_model_batch_images_sum": 0.0}
    for family in text_string_to_metric_families(http("GET", metrics)[1].decode()):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["mlops_model_batch_images_count"], totals["mlops_model_batch_images_sum"]


def measure(
    name: str,
    command: list[str],
    env: dict[str, str],
    health: str,
    predict: str,
    auth: str,
    body: Path,
    content_type: str,
    seconds: int,
    log: Path,
    metrics: str | None = None,
) -> dict[str, Any]:
    with served(command, env, health, log) as process:
        wrk(predict, body, content_type, auth, 8, 3)  # warm-up
        rows = []
        with PeakRss(process.pid) as memory:
            for concurrency in CONCURRENCY:
                before = model_calls(metrics) if metrics else None
                rows.append(wrk(predict, body, content_type, auth, concurrency, seconds))
                if before is not None:
                    calls, images = (a - b for a, b in zip(model_calls(metrics), before, strict=True))
                    rows[-1]["images_per_model_call"] = round(images / calls, 2) if calls else None
                print(name, rows[-1], flush=True)
        return {
            "server": name,
            "runs": rows,
            "peak_rss_mb": round(memory.peak / 2**20),
            "peak_process_rss_mb": round(memory.peak_worker / 2**20),
        }


@dataclass
class World:
    """What every round serves: the trained world's settings, the request and the bundle's model input."""

    tmp: Path
    settings: Any
    body_file: Path
    content_type: str
    folder: Path
    array: Any
    stages_ms: dict[str, float]
    image_bytes: int


def make_served_world(tmp: Path, args: argparse.Namespace) -> World:
    """Train and promote v1 in ``tmp``, import its bundle and time the in-service stages once."""
    from ml.config import load_settings
    from ml.data.images import ImageLimits, open_checked
    from ml.http import multipart
    from ml.release.build import import_model
    from ml.release.deploy import ensure_state
    from ml.serving.bundle import BundleMeta
    from ml.storage import storage_from_settings
    from ml.training.preprocessing import to_array

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    os.environ["BENTOML_HOME"] = str(tmp / "bentoml")
    os.environ.update(make_world(tmp, args.precision))
    if args.workers:
        os.environ["MLOPS__SERVING__WORKERS"] = str(args.workers)
    settings = load_settings()
    ensure_state(settings, storage_from_settings(settings))
    data = request_image()
    body, content_type = multipart("image", [("photo.jpg", data)])
    body_file = tmp / "body.bin"
    body_file.write_bytes(body)
    import bentoml

    folder = Path(bentoml.models.get(import_model(settings, "1")).path)
    profile = stage_profile(folder, body, content_type, data)
    print("per-request stages (ms):", profile, flush=True)
    prep = BundleMeta.read(folder).preprocessing
    _, rgb, _ = open_checked(data, ImageLimits.from_settings(settings.ingest), prep.draft_side())
    return World(tmp, settings, body_file, content_type, folder, to_array(rgb, prep), profile, len(data))


def one_round(world: World, args: argparse.Namespace) -> dict[str, Any]:
    """The model-only bound, then mlops, then plain, each alone on the machine: one report."""
    from ml.http import free_port
    from ml.release.build import SERVICE
    from ml.release.service import bentoml_command, serve_env

    settings = world.settings
    bound = model_only_bound(world.folder, world.array)
    results = []
    port = free_port()
    ours_env = serve_env(settings) | {"MLOPS_API_KEYS": KEY}
    results.append(
        measure(
            "mlops (BentoML + ONNX Runtime)",
            [bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
            ours_env,
            f"http://127.0.0.1:{port}/readyz",
            f"http://127.0.0.1:{port}/predict",
            f"Bearer {KEY}",
            world.body_file,
            world.content_type,
            args.duration,
            world.tmp / "mlops.log",
            metrics=f"http://127.0.0.1:{port}/metrics",
        )
    )
    port = free_port()
    results.append(
        measure(
            "plain (FastAPI + eager torch)",
            [
                sys.executable,
                str(REPO / "bench" / "plain_server.py"),
                "--model-uri",
                f"models:/{settings.mlflow.registered_model}/1",
                "--tracking-uri",
                settings.mlflow.tracking_uri,
                "--port",
                str(port),
            ],
            dict(os.environ),
            f"http://127.0.0.1:{port}/health",
            f"http://127.0.0.1:{port}/predict",
            "",
            world.body_file,
            world.content_type,
            args.duration,
            world.tmp / "plain.log",
        )
    )
    return {
        "image_bytes": world.image_bytes,
        "image_size": "640x480 JPEG",
        "workers": settings.serving.workers,
        "precision": settings.model.precision,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "model_only": bound,
        "stages_ms": world.stages_ms,
        "results": results,
    }


def round_medians(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency, the median over rounds of each figure; each round's share and ratio are taken
    against its own bound and its own plain server (the host's speed drifts between rounds)."""
    rows = []
    for index, concurrency in enumerate(CONCURRENCY):
        ours = [report["results"][0]["runs"][index] for report in reports]
        plain = [report["results"][1]["runs"][index] for report in reports]
        shares = [a["rps"] / r["model_only"]["img_s"] for a, r in zip(ours, reports, strict=True)]
        ratios = [a["rps"] / b["rps"] for a, b in zip(ours, plain, strict=True)]
        rows.append(
            {
                "concurrency": concurrency,
                "mlops_rps": round(statistics.median(a["rps"] for a in ours), 1),
                "share_of_bound": round(statistics.median(shares), 3),
                "shares": [round(share, 3) for share in shares],
                "mlops_p99_ms": round(statistics.median(a["p99_ms"] for a in ours), 1),
                "plain_rps": round(statistics.median(b["rps"] for b in plain), 1),
                "vs_plain": round(statistics.median(ratios), 2),
                "ratios": [round(ratio, 2) for ratio in ratios],
            }
        )
    return rows


def rounds_table(reports: list[dict[str, Any]], medians: list[dict[str, Any]]) -> str:
    bounds = ", ".join(str(report["model_only"]["img_s"]) for report in reports)
    lines = [
        f"## median of {len(reports)} rounds (model-only bound per round: {bounds} img/s)",
        "",
        "| concurrency | mlops req/s | share of its round's bound (each round) | mlops p99 ms "
        "| plain req/s | mlops / plain (each round) |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for row in medians:
        shares = ", ".join(f"{100 * share:.0f}%" for share in row["shares"])
        ratios = ", ".join(f"{ratio:.1f}x" for ratio in row["ratios"])
        lines.append(
            f"| {row['concurrency']} | {row['mlops_rps']} "
            f"| **{100 * row['share_of_bound']:.0f}%** ({shares}) | {row['mlops_p99_ms']} "
            f"| {row['plain_rps']} | **{row['vs_plain']:.1f}x** ({ratios}) |"
        )
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    ours, plain = report["results"]
    bound = report["model_only"]["img_s"]
    lines = [
        f"Model-only bound: {bound} img/s ({report['model_only']['best']}; all layouts: "
        f"{report['model_only']['layouts']})",
        "",
        "| concurrency | mlops req/s | share of bound | mlops p50 / p99 ms | plain req/s "
        "| plain p50 / p99 ms | mlops / plain | mlops images per model call |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(ours["runs"], plain["runs"], strict=True):
        lines.append(
            f"| {a['concurrency']} | {a['rps']} | {100 * a['rps'] / bound:.0f}% "
            f"| {a['p50_ms']} / {a['p99_ms']} | {b['rps']} | {b['p50_ms']} / {b['p99_ms']} "
            f"| {a['rps'] / b['rps']:.1f}x | {a.get('images_per_model_call', '-')} |"
        )
    lines.append(
        "\nPer-request stages, one thread, median ms: "
        + ", ".join(f"{name} {ms}" for name, ms in report["stages_ms"].items())
    )
    lines.append(
        f"\nPeak RSS (whole process tree): mlops {ours['peak_rss_mb']} MB "
        f"(largest process {ours['peak_process_rss_mb']} MB), plain {plain['peak_rss_mb']} MB. "
        f"Failed requests: mlops {sum(r['non_2xx'] + r['socket_errors'] for r in ours['runs'])}, "
        f"plain {sum(r['non_2xx'] + r['socket_errors'] for r in plain['runs'])}."
    )
    return "\n".join(lines)


def stop_on_term(signum: int, _frame: object) -> None:
    """SIGTERM as an exit: the ``finally`` that stops a started server runs."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=20, help="seconds per concurrency level")
    parser.add_argument("--workers", type=int, help="service worker processes (default: serving.workers)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="model.precision")
    parser.add_argument(
        "--rounds", type=int, default=1, help="bound, mlops and plain this many times, one world"
    )
    parser.add_argument(
        "--keep-world", action="store_true", help="keep the trained world's folder and the server logs"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds takes 1 or more")
    # a `kill` of the benchmark stops the server it started too (each runs in its own session)
    signal.signal(signal.SIGTERM, stop_on_term)
    with world_folder("mlops-bench-serve-", args.keep_world) as tmp:
        run_rounds(make_served_world(tmp, args), args)


def run_rounds(world: World, args: argparse.Namespace) -> None:
    """Each round's report printed and written as it ends; with more than one, the medians too."""
    RESULTS.mkdir(exist_ok=True)
    name = "serve" if args.precision == "fp32" else f"serve-{args.precision}"
    reports = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"\n## round {number} of {args.rounds}\n", flush=True)
        reports.append(one_round(world, args))
        (RESULTS / f"{name}.json").write_text(json.dumps(reports[-1], indent=2))
        print(table(reports[-1]), flush=True)
    if args.rounds > 1:
        medians = round_medians(reports)
        (RESULTS / f"{name}_rounds.json").write_text(
            json.dumps({"medians": medians, "rounds": reports}, indent=2)
        )
        print("\n" + rounds_table(reports, medians))


if __name__ == "__main__":
    main()
