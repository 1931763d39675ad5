"""The service as a process: ``bentoml serve`` in its own process group, its environment and host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ml.config import REPO_ROOT, Settings
from ml.release.build import use_bentoml_home
from ml.serving.auth import api_keys

STATE_ENV = "MLOPS_DEPLOYMENT_STATE"  # the service reads its deployment state file from here
STATE_FILE = "deployment.json"


def state_path(settings: Settings) -> Path:
    """The deployment state file the live service follows."""
    return (REPO_ROOT / settings.serving.state_dir).resolve() / STATE_FILE


def bentoml_command() -> str:
    return str(Path(sys.executable).parent / "bentoml")


def start_service(
    target: str, port: int, env: dict[str, str], log_file: Path, host: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    """``bentoml serve TARGET`` (a bento tag or the source service) in its own process group."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [bentoml_command(), "serve", target, "--host", host, "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_service(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def serve_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env[STATE_ENV] = str(state_path(settings))
    env["BENTOML_HOME"] = str(use_bentoml_home(settings))
    return env


def serve_host(settings: Settings) -> str:
    """The configured host, or 127.0.0.1 when no API key is configured (never an open endpoint)."""
    if not api_keys(keys_file=settings.serving.api_keys_file) and settings.serving.host not in (
        "127.0.0.1",
        "localhost",
    ):
        print(
            "WARNING: no API key configured (MLOPS_API_KEYS); "
            f"binding to 127.0.0.1, not {settings.serving.host}",
            file=sys.stderr,
        )
        return "127.0.0.1"
    return settings.serving.host
