"""``make up`` / ``make down``: start and stop the long-running pieces on one machine.

``up`` starts ``airflow standalone`` (API server and UI on 127.0.0.1:8080, scheduler, DAG
processor, triggerer) in its own process group, waits until it is healthy and unpauses the
project's DAGs so schedules and Asset triggers run. ``down`` stops it with SIGINT, the signal
``airflow standalone`` shuts its children down on.
"""

from __future__ import annotations

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
DAG_IDS = ("ingest_daily", "drift_monitor", "retrain")


def api_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('AIRFLOW__API__PORT', '8080')}"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME", Path.cwd() / ".airflow"))


def _pidfile() -> Path:
    return airflow_home() / "standalone.pid"


def airflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True
    )


def local_secret(name: str) -> str:
    """A random secret created once per checkout (under AIRFLOW_HOME, mode 0600), never committed."""
    path = airflow_home() / f".{name}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def _running_pid() -> int | None:
    try:
        pid = int(_pidfile().read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def healthy(timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url()}/api/v2/monitor/health", timeout=timeout) as response:
            body = json.load(response)
        return body.get("scheduler", {}).get("status") == "healthy"
    except (OSError, ValueError):
        return False


def _unpause(dag_id: str, deadline: float) -> bool:
    """Unpause once the DAG processor has registered the DAG (new DAGs start paused)."""
    while time.monotonic() < deadline:
        if airflow_cli("dags", "unpause", dag_id).returncode == 0:
            return True
        time.sleep(3)
    return False


def up(wait_seconds: float = 240.0) -> int:
    home = airflow_home()
    home.mkdir(parents=True, exist_ok=True)
    if _running_pid():
        print(f"already running (pid {_running_pid()}): {api_url()}")
        return 0
    log = (home / "standalone.log").open("ab")
    env = dict(os.environ)  # standalone starts its components as `airflow ...` from PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Every component must sign and verify task tokens with the same key.
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", local_secret("jwt_secret"))
    env.setdefault("AIRFLOW__API__SECRET_KEY", local_secret("api_secret_key"))
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{api_url()}/execution/")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "airflow"), "standalone"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    _pidfile().write_text(str(process.pid))
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline and not healthy():
        if process.poll() is not None:
            print(f"airflow standalone exited with {process.returncode}; see {home / 'standalone.log'}")
            return 1
        time.sleep(2)
    if not healthy():
        print(f"airflow did not become healthy in {wait_seconds:.0f} s; see {home / 'standalone.log'}")
        return 1
    unpaused = [dag_id for dag_id in DAG_IDS if _unpause(dag_id, deadline=time.monotonic() + 90)]
    if len(unpaused) != len(DAG_IDS):
        print(f"could not unpause {sorted(set(DAG_IDS) - set(unpaused))}; see {home / 'standalone.log'}")
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
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(payload).encode() if payload is not None else None,
            method=method or ("POST" if payload is not None else "GET"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        for attempt in range(5):  # SQLite can make the API server answer 500 while the scheduler writes
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == 4:
                    raise
                time.sleep(2)
        return None

    @classmethod
    def as_admin(cls) -> Api:
        """A client logged in as the simple auth manager's ``admin`` (password file in AIRFLOW_HOME)."""
        passwords = json.loads((airflow_home() / PASSWORDS_FILE).read_text())
        api = cls(api_url())
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
            time.sleep(3)
        return state

    def wait_new_run(self, dag_id: str, known: set[str], seconds: float = 120) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            new = [run for run in self.runs(dag_id) if run["dag_run_id"] not in known]
            if new:
                return new[-1]
            time.sleep(3)
        return None


def down(wait_seconds: float = 60.0) -> int:
    pid = _running_pid()
    if pid is None:
        print("not running")
        return 0
    os.killpg(pid, signal.SIGINT)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline and _running_pid():
        time.sleep(1)
    if _running_pid():
        os.killpg(pid, signal.SIGKILL)
    _pidfile().unlink(missing_ok=True)
    print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    command = (argv or sys.argv[1:] or ["up"])[0]
    if command not in ("up", "down"):
        print("usage: python -m ml.stack up|down", file=sys.stderr)
        return 2
    return up() if command == "up" else down()


if __name__ == "__main__":
    raise SystemExit(main())
