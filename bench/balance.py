"""Benchmark: the service's two workers with and without connection balancing, alternated in one run.

The same world, bundle and request as ``bench/serve.py``; ``mlops serve``'s service is started
``--rounds`` times with ``serving.balance_connections`` on, then off (alternately), and Debian's
``wrk`` (1 thread) posts at concurrency 4 and 8 for ``--duration`` seconds each. Reported per
run: requests/s, p99, failed requests, and each worker's CPU seconds over the run (a worker with
~0 s is one that got no connection: the others all landed on its sibling).

Usage: python bench/balance.py [--rounds 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # bench/serve.py: the world, the request, wrk

CONCURRENCY = (4, 8)


def measure(
    layout: str, env: dict[str, str], body: Path, content_type: str, seconds: int, log: Path
) -> list[dict[str, Any]]:
    from ml.http import free_port
    from ml.release.build import SERVICE
    from ml.release.service import bentoml_command

    port = free_port()
    command = [bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]
    rows = []
    with bench.served(command, env, f"http://127.0.0.1:{port}/readyz", log) as process:
        url, auth = f"http://127.0.0.1:{port}/predict", f"Bearer {bench.KEY}"
        bench.wrk(url, body, content_type, auth, 8, 3)  # warm-up
        workers = [
            p for p in psutil.Process(process.pid).children(recursive=True) if "--worker-id" in p.cmdline()
        ]
        for concurrency in CONCURRENCY:
            before = [sum(p.cpu_times()[:2]) for p in workers]
            run = bench.wrk(url, body, content_type, auth, concurrency, seconds)
            cpu = [round(sum(p.cpu_times()[:2]) - b, 1) for p, b in zip(workers, before, strict=True)]
            rows.append({"layout": layout, **run, "worker_cpu_s": sorted(cpu)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per concurrency level")
    parser.add_argument("--keep-world", action="store_true", help="keep the world's folder and the logs")
    args = parser.parse_args()
    with bench.world_folder("mlops-bench-balance-", args.keep_world) as tmp:
        rows, workers = run(tmp, args)
    bench.RESULTS.mkdir(exist_ok=True)
    (bench.RESULTS / "balance.json").write_text(json.dumps({"workers": workers, "runs": rows}, indent=2))
    print(
        "\n| layout | concurrency | req/s | p99 ms | failed | worker CPU s |\n|---|---:|---:|---:|---:|---|"
    )
    for row in sorted(rows, key=lambda r: (r["layout"], r["concurrency"])):
        failed = row["non_2xx"] + row["socket_errors"]
        cpu = " / ".join(str(c) for c in row["worker_cpu_s"])
        print(
            f"| {row['layout']} | {row['concurrency']} | {row['rps']} | {row['p99_ms']} | {failed} | {cpu} |"
        )


def run(tmp: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Both layouts ``args.rounds`` times on one world in ``tmp``: the rows and the worker count."""
    from ml.config import load_settings
    from ml.http import multipart
    from ml.release.deploy import ensure_state
    from ml.release.service import serve_env
    from ml.storage import storage_from_settings

    os.environ["BENTOML_HOME"] = str(tmp / "bentoml")
    os.environ.update(bench.make_world(tmp))
    settings = load_settings()
    ensure_state(settings, storage_from_settings(settings))
    body, content_type = multipart("image", [("photo.jpg", bench.request_image())])
    body_file = tmp / "body.bin"
    body_file.write_bytes(body)
    env = serve_env(settings) | {"MLOPS_API_KEYS": bench.KEY}
    layouts = {"balanced": "true", "unbalanced": "false"}
    rows = []
    for _ in range(args.rounds):
        for layout, flag in layouts.items():
            rows += measure(
                layout,
                env | {"MLOPS__SERVING__BALANCE_CONNECTIONS": flag},
                body_file,
                content_type,
                args.duration,
                tmp / f"{layout}.log",
            )
    return rows, settings.serving.workers


if __name__ == "__main__":
    main()
