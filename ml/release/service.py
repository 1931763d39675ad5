"""The service as a process: ``bentoml serve`` in its own process group, its environment and host,
and a graceful restart of its workers that keeps the listening socket.

``bentoml serve`` runs a circus arbiter (it renames itself ``circusd``) that holds the listening
socket and runs the workers. On SIGHUP the arbiter reloads gracefully: it starts a new set of
workers on the same socket and stops the old ones (each stops accepting, serves what it
accepted, then exits: ``ml.serving.lifecycle``), so connections never find the port closed; the
ones that arrive while no worker accepts wait in the socket's backlog.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ml.config import REPO_ROOT, Settings
from ml.http import NotReady, wait_ready
from ml.release.build import use_bentoml_home
from ml.release.errors import DeployError
from ml.serving.auth import KeyConfigError, is_loopback, key_table
from ml.serving.binding import load_secret, secret_path

REPLICA_ENV = "MLOPS_REPLICA_ID"  # the name a replica's heartbeats carry (default: host-port)
FOLLOW_ENV = "MLOPS_FOLLOW_STATE"  # "off": serve the packed model, ignore the deployment state (checks)
PID_FILE = "serve-{port}.pid"  # the arbiter of the `mlops serve` on that port (for `--reload`)


def serving_dir(settings: Settings) -> Path:
    """This host's serving folder: logs, pid files, the request-id secret (the state is in storage)."""
    return (REPO_ROOT / settings.serving.state_dir).resolve()


def pid_path(settings: Settings, port: int) -> Path:
    return serving_dir(settings) / PID_FILE.format(port=port)


def replica_id(port: int) -> str:
    """A replica's name: the host and the port it serves on (unique per host; a pod name in k8s)."""
    return f"{socket.gethostname()}-{port}"


def bentoml_command() -> str:
    return str(Path(sys.executable).parent / "bentoml")


def tls_args(settings: Settings) -> list[str]:
    """``--ssl-certfile/--ssl-keyfile`` when ``serving.tls_cert``/``tls_key`` are set."""
    serving = settings.serving
    if not serving.tls_cert or not serving.tls_key:
        return []
    files = [(REPO_ROOT / name).resolve() for name in (serving.tls_cert, serving.tls_key)]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise DeployError(f"TLS file(s) not found: {', '.join(missing)}")
    return ["--ssl-certfile", str(files[0]), "--ssl-keyfile", str(files[1])]


def tls_ca_file(settings: Settings) -> str | None:
    """What local clients verify the service's certificate with (None when TLS is off)."""
    return settings.serving.ca_file


def serve_command(target: str, host: str, port: int, tls: list[str] | None = None) -> list[str]:
    return [bentoml_command(), "serve", target, "--host", host, "--port", str(port), *(tls or [])]


def start_service(
    target: str,
    port: int,
    env: dict[str, str],
    log_file: Path,
    host: str = "127.0.0.1",
    tls: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``bentoml serve TARGET`` (a bento tag or the source service) in its own process group."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - bentoml serve from this venv, argv built here, no shell
            serve_command(target, host, port, tls),
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


def instance_home(shared: Path, name: str) -> Path:
    """A BentoML home of its own for one server, sharing the model and bento stores of ``shared``.

    BentoML keeps its Prometheus multiprocess folder in its home and empties it when a server
    starts: two servers on one home (the live service and a serving check's scratch service)
    would wipe each other's metrics.
    """
    home = shared / "instances" / name
    home.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        if not (home / store).is_symlink():
            (home / store).symlink_to(shared / store, target_is_directory=True)
    return home


def serve_env(settings: Settings, port: int | None = None) -> dict[str, str]:
    """The service's environment (with ``port``: its own BentoML home); the request-id secret exists
    before any worker starts."""
    env = dict(os.environ)
    env.setdefault(REPLICA_ENV, replica_id(port or settings.serving.port))
    home = use_bentoml_home(settings)
    env["BENTOML_HOME"] = str(instance_home(home, f"serve-{port}") if port else home)
    load_secret(secret_path(settings.serving.state_dir, settings.serving.feedback_secret_file), env)
    return env


def serve_host(settings: Settings) -> str:
    """The configured host; ``KeyConfigError`` beyond loopback with no API key (never an open endpoint)."""
    keys = key_table(keys_file=settings.serving.api_keys_file)  # a short or malformed key raises here
    host = settings.serving.host
    if not keys and not is_loopback(host):
        raise KeyConfigError(
            f"no API key configured (MLOPS_API_KEYS or serving.api_keys_file) and serving.host is {host}: "
            "refusing to serve beyond loopback without keys; configure a key or set serving.host: 127.0.0.1"
        )
    return host


def _children(pid: int) -> set[int]:
    """The worker processes of an arbiter (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def running_arbiter(settings: Settings, port: int) -> int:
    """The pid of the `mlops serve` running on ``port`` (its arbiter); ``DeployError`` when none runs."""
    path = pid_path(settings, port)
    try:
        pid = int(path.read_text().strip())
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        name = ""
    if name != "circusd":  # `bentoml serve` renames itself circusd; anything else is a stale pid
        raise DeployError(f"no running `mlops serve` (no live arbiter in {path})")
    return pid


def reload_service(settings: Settings, port: int, timeout: float = 120) -> dict[str, object]:
    """Restart the workers of the service on ``port`` gracefully (SIGHUP to its arbiter); wait until
    the old ones are gone and the endpoint is ready again."""
    workers = settings.serving.workers
    pid = running_arbiter(settings, port)
    before = _children(pid)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _children(pid)
        if len(now - before) >= workers and not (now & before):
            left = max(1.0, deadline - time.monotonic())
            try:
                url = settings.serving.live_url.rsplit(":", 1)[0] + f":{port}"
                wait_ready(url, None, left, ca_file=tls_ca_file(settings))
            except NotReady as exc:
                raise DeployError(f"`mlops serve` (pid {pid}) restarted its workers but: {exc}") from None
            return {"reloaded": True, "arbiter": pid, "old_workers": sorted(before), "workers": sorted(now)}
        time.sleep(0.3)
    raise DeployError(f"`mlops serve` (pid {pid}) did not replace all its workers within {timeout:.0f} s")
