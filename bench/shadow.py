"""Benchmark: what a shadow model costs the stable answers, one run, side by side.

The live service (``bentoml serve`` as ``mlops serve`` runs it) serves v1; Debian's ``wrk`` posts
the same 640x480 JPEG at each concurrency for ``--duration`` seconds, first with no shadow, then
with v2 deployed as the shadow (``deploy(..., stage="shadow")``: every stable request is copied
to v2 after its answer went out, and v2's answer is only logged). Reported: requests/s and
p50/p99 of the stable answers, both ways, and the shadow report (agreement, its own latency).

Usage: python bench/shadow.py [--duration 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import KEY, PeakRss, make_world, request_image, world_folder, wrk  # the sibling benchmark

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (4, 8)


def runs(predict: str, body: Path, content_type: str, seconds: int) -> list[dict[str, Any]]:
    wrk(predict, body, content_type, f"Bearer {KEY}", 8, 3)  # warm-up
    return [wrk(predict, body, content_type, f"Bearer {KEY}", c, seconds) for c in CONCURRENCY]


def run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ml.config import load_settings
    from ml.http import free_port, multipart, wait_ready
    from ml.monitoring.shadow import measure_shadow
    from ml.release.build import SERVICE
    from ml.release.deploy import deploy, ensure_state
    from ml.release.service import bentoml_command, serve_env, stop_service
    from ml.storage import storage_from_settings
    from ml.training.pipeline import retrain

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    os.environ["BENTOML_HOME"] = str(tmp / "bentoml")
    os.environ.update(make_world(tmp))
    port = free_port()
    os.environ["MLOPS__SERVING__PORT"] = str(port)
    settings = load_settings()
    storage = storage_from_settings(settings)
    shadow = retrain(settings, storage, force=True, overrides={"epochs": 15, "learning_rate": 0.002})
    ensure_state(settings, storage)
    body, content_type = multipart("image", [("photo.jpg", request_image())])
    body_file = tmp / "body.bin"
    body_file.write_bytes(body)
    command = [bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]
    with (tmp / "service.log").open("ab") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=serve_env(settings, port) | {"MLOPS_API_KEYS": KEY},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    predict = f"http://127.0.0.1:{port}/predict"
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, 180)
        with PeakRss(process.pid) as alone_rss:
            alone = runs(predict, body_file, content_type, args.duration)
        staged = deploy(settings, storage, str(shadow.model_version), stage="shadow", by="bench")
        started = dt.datetime.now(dt.UTC)
        with PeakRss(process.pid) as shadowed_rss:
            shadowed = runs(predict, body_file, content_type, args.duration)
        time.sleep(settings.serving.log_flush_seconds + 2)  # the shadow's answers reach the log
        report = measure_shadow(storage, "1", str(shadow.model_version), started, dt.datetime.now(dt.UTC))
    finally:
        stop_service(process)
    return {
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "workers": settings.serving.workers,
        "shadow_live": staged.live,
        "without_shadow": alone,
        "with_shadow": shadowed,
        "peak_rss_mb": {"without": round(alone_rss.peak / 2**20), "with": round(shadowed_rss.peak / 2**20)},
        "shadow_report": report.to_dict(),
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| concurrency | no shadow req/s | p50 / p99 ms | with shadow req/s | p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for alone, shadowed in zip(report["without_shadow"], report["with_shadow"], strict=True):
        lines.append(
            f"| {alone['concurrency']} | {alone['rps']} | {alone['p50_ms']} / {alone['p99_ms']} | "
            f"{shadowed['rps']} | {shadowed['p50_ms']} / {shadowed['p99_ms']} |"
        )
    shadow = report["shadow_report"]
    lines.append(f"\nshadow: {shadow['summary']}; its own latency {shadow['shadow_latency_ms']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--keep-world", action="store_true", help="keep the world's folder and the log")
    args = parser.parse_args()
    with world_folder("mlops-bench-shadow-", args.keep_world) as tmp:
        report = run(tmp, args)
    out = REPO / "bench" / "results" / "shadow.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
