"""``make up`` / ``make down``: start and stop the long-running pieces on one machine.

``up`` starts, each in its own process group with a pid file under ``$AIRFLOW_HOME``:
``airflow standalone`` (API server and UI on 127.0.0.1:8080, scheduler, DAG processor,
triggerer; the project's DAGs unpaused so schedules and Asset triggers run), the MLflow UI
(127.0.0.1:5000, ``MLOPS_MLFLOW_UI_PORT``) on the configured tracking store, the report server
(a local storage root's ``reports/`` on 127.0.0.1:``reports.port``, what alert links open) and the
prediction service (``mlops serve``, 127.0.0.1:3000) once a champion exists. ``down`` stops them with
SIGTERM to each group, ``airflow standalone``'s included: each of its processes exits on it. After
SIGINT (Ctrl-C's signal) the LocalExecutor's workers that have run a task stay, and the scheduler waits
for them, until SIGTERM and SIGKILL follow 20 and 30 s later (measured: 30.6 s to stop, against 7.4 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
DAG_IDS = ("ingest_daily", "drift_monitor", "retrain", "rollback", "monitor_serving", "tune")


def api_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('AIRFLOW__API__PORT', '8080')}"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME", Path.cwd() / ".airflow"))


def _pidfile(name: str = "standalone") -> Path:
    return airflow_home() / f"{name}.pid"


def mlflow_ui_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('MLOPS_MLFLOW_UI_PORT', '5000')}"


def airflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    return subprocess.run(command, capture_output=True, text=True)  # noqa: S603 - this venv's airflow, no shell


def local_secret(name: str) -> str:
    """A random secret created once per checkout (under AIRFLOW_HOME, mode 0600), never committed."""
    path = airflow_home() / f".{name}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def running_pid(name: str = "standalone") -> int | None:
    try:
        pid = int(_pidfile(name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child: a zombie still answers kill(0)
    except ChildProcessError:
        pass  # started by another process (`make up` earlier)
    try:
        os.kill(pid, 0)
        return pid
    except (ProcessLookupError, PermissionError):
        return None


def service_running() -> bool:
    return running_pid("service") is not None


def healthy(timeout: float = 2.0) -> bool:
    try:
        health = f"{api_url()}/api/v2/monitor/health"  # the stack's own API on loopback
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310
            body = json.load(response)
        return body.get("scheduler", {}).get("status") == "healthy"
    except (OSError, ValueError):
        return False


def unpause_dags(deadline: float) -> list[str]:
    """Unpause each of ``DAG_IDS`` once the DAG processor has registered it (new DAGs start paused),
    through the REST API (an ``airflow dags unpause`` takes seconds to start); those it could not."""
    api, waiting = Api.as_admin(), list(DAG_IDS)
    while waiting and time.monotonic() < deadline:
        registered = {dag["dag_id"]: dag["is_paused"] for dag in api.call("/api/v2/dags?limit=100")["dags"]}
        for dag_id in [dag_id for dag_id in waiting if dag_id in registered]:
            if registered[dag_id]:
                api.call(f"/api/v2/dags/{dag_id}", {"is_paused": False}, method="PATCH")
            waiting.remove(dag_id)
        if waiting:
            time.sleep(1)
    return waiting


def settle_unpause_runs(api: Api, seconds: float = 60) -> None:
    """Unpausing runs the latest cron tick of ``retrain`` and ``monitor_serving`` once; let them finish
    (before anything is ingested: a retrain that starts later trains on whatever is there by then)."""
    deadline, pending = time.monotonic() + seconds, {"retrain", "monitor_serving"}
    while pending and time.monotonic() < deadline:
        for dag_id in sorted(pending):
            runs = api.runs(dag_id)
            for run in runs:
                if run["state"] in ("queued", "running"):
                    state = api.wait(dag_id, run["dag_run_id"])
                    print(f"{dag_id} run {run['dag_run_id']} (started by the unpause): {state}")
            if runs:
                pending.discard(dag_id)
        if pending:
            time.sleep(2)


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, output to ``$AIRFLOW_HOME/<name>.log``, pid in a file."""
    home = airflow_home()
    home.mkdir(parents=True, exist_ok=True)
    with (home / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - argv of this venv's programs, no shell
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    _pidfile(name).write_text(str(process.pid))
    return process


def _ready(url: str, process: subprocess.Popen[bytes], seconds: float) -> bool:
    from ml.http import NotReady, wait_ready

    try:
        wait_ready(url, process, seconds, path="")
        return True
    except NotReady:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _signal_and_wait(name: str, pid: int, sig: int, wait_seconds: float) -> bool:
    """Signal the group ``pid``; True once none of it lives, False when ``wait_seconds`` ran out."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + wait_seconds
    while running_pid(name) or group_members(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def stop_group(name: str, wait_seconds: float = 30.0) -> bool:
    """SIGTERM the process group in ``<name>.pid``, wait until none of it lives; True when it was running.

    A group still alive after ``wait_seconds`` gets SIGKILL."""
    pid = running_pid(name)
    if pid is None:
        _pidfile(name).unlink(missing_ok=True)
        return False
    if not _signal_and_wait(name, pid, signal.SIGTERM, wait_seconds):
        _signal_and_wait(name, pid, signal.SIGKILL, 5.0)  # children that outlived their leader go too
    running_pid(name)  # reap it
    _pidfile(name).unlink(missing_ok=True)
    return True


def _launch(name: str, argv: list[str], ready_url: str, wait_seconds: float, shown: str) -> int:
    """Start ``argv`` as ``name`` unless it runs; 0 once ``ready_url`` answers 200, else 1."""
    if running_pid(name):
        return 0
    if not _ready(ready_url, spawn(name, argv), wait_seconds):
        print(f"{name} did not become ready; see {airflow_home() / f'{name}.log'}")
        return 1
    print(shown)
    return 0


def start_mlflow_ui(wait_seconds: float = 90.0) -> int:
    from ml import registry
    from ml.config import load_settings

    port = mlflow_ui_url().rsplit(":", 1)[1]
    uri = registry.tracking_uri(load_settings())
    argv = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri]
    argv += ["--host", "127.0.0.1", "--port", port]
    shown = f"MLflow UI:   {mlflow_ui_url()}  ({uri})"
    return _launch("mlflow", argv, f"{mlflow_ui_url()}/health", wait_seconds, shown)


def start_reports(wait_seconds: float = 30.0) -> int:
    """The report server alert links point at (``ml.ops.reports``); none for S3 roots (presigned links)."""
    from ml.config import load_settings

    settings = load_settings()
    if settings.storage.root.startswith("s3://"):
        print("reports:     presigned S3 links (no local server)")
        return 0
    url = f"http://127.0.0.1:{settings.reports.port}"
    argv = [sys.executable, "-m", "ml.ops.reports"]
    return _launch("reports", argv, f"{url}/healthz", wait_seconds, f"reports:     {url}/reports/")


def start_service(wait_seconds: float = 120.0) -> int:
    """``mlops serve``: the live endpoint for the deployed model (none before the first champion)."""
    from ml import registry
    from ml.config import load_settings

    settings = load_settings()
    if not running_pid("service") and registry.version_for_alias(settings, registry.CHAMPION) is None:
        print("service:     not started (no champion model yet; `make up` again after the first retrain)")
        return 0
    url = settings.serving.live_url
    shown = f"service:     {url}  (POST /predict, /feedback; GET /metrics, /version)"
    argv = [str(Path(sys.executable).parent / "mlops"), "serve"]
    return _launch("service", argv, f"{url}/readyz", wait_seconds, shown)


def up(wait_seconds: float = 240.0) -> int:
    """Airflow standalone, then the MLflow UI, the report server and the service."""
    code = start_airflow(wait_seconds)
    return code or start_mlflow_ui() or start_reports() or start_service()


def start_airflow(wait_seconds: float = 240.0) -> int:
    home = airflow_home()
    home.mkdir(parents=True, exist_ok=True)
    if running_pid():
        print(f"Airflow:     already running (pid {running_pid()}): {api_url()}")
        return 0
    env = dict(os.environ)  # standalone starts its components as `airflow ...` from PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Every component must sign and verify task tokens with the same key.
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", local_secret("jwt_secret"))
    env.setdefault("AIRFLOW__API__SECRET_KEY", local_secret("api_secret_key"))
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{api_url()}/execution/")
    process = spawn("standalone", [str(Path(sys.executable).parent / "airflow"), "standalone"], env)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline and not healthy():
        if process.poll() is not None:
            print(f"airflow standalone exited with {process.returncode}; see {home / 'standalone.log'}")
            return 1
        time.sleep(2)
    if not healthy():
        print(f"airflow did not become healthy in {wait_seconds:.0f} s; see {home / 'standalone.log'}")
        return 1
    still_paused = unpause_dags(deadline=time.monotonic() + 90)
    if still_paused:
        print(f"could not unpause {sorted(still_paused)}; see {home / 'standalone.log'}")
        return 1
    passwords = home / PASSWORDS_FILE
    print(f"Airflow UI:  {api_url()}  (user admin, password in {passwords})")
    print(f"log:         {home / 'standalone.log'}\nstop with:   make down")
    return 0


@dataclass
class Api:
    """The Airflow REST API of the running stack (JWT from the simple auth manager)."""

    url: str
    token: str = ""

    def call(self, path: str, payload: dict | None = None, method: str | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the stack's own API (http on loopback)
            f"{self.url}{path}",
            data=json.dumps(payload).encode() if payload is not None else None,
            method=method or ("POST" if payload is not None else "GET"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        for attempt in range(5):  # SQLite can make the API server answer 500 while the scheduler writes
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == 4:
                    raise
                time.sleep(2)
        return None

    @classmethod
    def as_admin(cls, url: str | None = None, home: Path | None = None) -> Api:
        """A client of the API server at ``url`` (this environment's by default), logged in as the simple
        auth manager's ``admin`` (password file in ``home``, by default AIRFLOW_HOME)."""
        passwords = json.loads(((home or airflow_home()) / PASSWORDS_FILE).read_text())
        api = cls(url or api_url())
        api.token = api.call("/auth/token", {"username": "admin", "password": passwords["admin"]})[
            "access_token"
        ]
        return api

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.call(f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=-run_after")["dag_runs"]

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        return self.call(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def wait(self, dag_id: str, run_id: str, seconds: float = 900) -> str:
        deadline, state = time.monotonic() + seconds, ""
        while time.monotonic() < deadline:
            state = self.call(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(1)
        return state

    def wait_new_run(self, dag_id: str, known: set[str], seconds: float = 120) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            new = [run for run in self.runs(dag_id) if run["dag_run_id"] not in known]
            if new:
                return new[-1]
            time.sleep(1)
        return None


def down(wait_seconds: float = 20.0) -> int:
    """Stop the service, the report server, the MLflow UI and Airflow (whatever of them runs)."""
    stopped = [name for name in ("service", "reports", "mlflow") if stop_group(name)]
    if stop_group("standalone", wait_seconds):
        stopped.append("airflow")
    print(f"stopped {', '.join(stopped)}" if stopped else "not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    command = (argv or sys.argv[1:] or ["up"])[0]
    if command not in ("up", "down"):
        print("usage: python -m ml.ops.stack up|down", file=sys.stderr)
        return 2
    return up() if command == "up" else down()


if __name__ == "__main__":
    raise SystemExit(main())
