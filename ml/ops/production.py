"""The production profile, run for real: ``make up PROFILE=production`` / ``make down PROFILE=production``.

Starts, each in its own process group with a pid file and a log under ``production.airflow_home``:
a local S3 API when the profile asks for one (``moto_server``: this machine's stand-in for S3 or
MinIO), the MLflow server (PostgreSQL store, S3 artifacts), Airflow on PostgreSQL with the
CeleryExecutor over Redis (API server, scheduler, DAG processor, triggerer) and one Celery worker
per ``production.workers`` entry (its own hostname, queues and concurrency), then one ``mlops serve``
replica per ``production.replica_ports`` once a champion exists. Databases and buckets are created
when missing. Everything comes from the profile's overlay (``profiles/production.yaml`` unless
``MLOPS_CONFIG`` names another); nothing here is specific to this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ml.config import REPO_ROOT, ProductionConfig, Settings, load_settings
from ml.ops import stack

PROFILE_FILE = REPO_ROOT / "profiles" / "production.yaml"
WORKER_ENV = "MLOPS_WORKER_NAME"  # read by mlops_airflow.hosts.worker_hostname: the task's hostname
HOSTNAME_CALLABLE = "mlops_airflow.hosts.worker_hostname"
AIRFLOW_PARTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def bin_path(program: str) -> str:
    return str(Path(sys.executable).parent / program)


def profile(settings: Settings) -> ProductionConfig:
    if settings.production is None:
        raise SystemExit(
            "the config has no `production` section: use profiles/production.yaml (MLOPS_CONFIG)"
        )
    return settings.production


def home_of(config: ProductionConfig) -> Path:
    home = Path(config.airflow_home)
    return home if home.is_absolute() else (Path.cwd() / home).resolve()


def sqlalchemy_to_celery(url: str) -> str:
    """Celery's database result backend takes ``db+<sqlalchemy url>``."""
    return f"db+{url}"


def fernet_key() -> str:
    """A Fernet key created once per profile home (Airflow encrypts connections with it)."""
    path = stack.airflow_home() / ".fernet_key"
    if not path.exists():
        import base64

        path.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
        path.chmod(0o600)
    return path.read_text().strip()


def api_key_file() -> Path:
    """The replicas' keys file (one admin key), created once per profile home."""
    path = stack.airflow_home() / "api_keys"
    if not path.exists():
        path.write_text(f"{secrets.token_urlsafe(32)} predict,feedback,admin\n")
        path.chmod(0o600)
    return path


def profile_env(settings: Settings) -> dict[str, str]:
    """What every component of the profile is started with (added to the caller's environment)."""
    config = profile(settings)
    api = f"http://127.0.0.1:{config.api_port}"
    env = {
        "AIRFLOW_HOME": str(stack.airflow_home()),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": config.database_url,
        "AIRFLOW__CELERY__BROKER_URL": config.broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": sqlalchemy_to_celery(config.database_url),
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",  # a busy worker leaves queued tasks to the other
        # tasks run in each worker's main process (see CeleryWorkerConfig.concurrency for why)
        "AIRFLOW__CELERY__POOL": "solo",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
        "AIRFLOW__CORE__FERNET_KEY": fernet_key(),
        "AIRFLOW__API__PORT": str(config.api_port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        # every component signs and verifies task tokens with the same keys
        "AIRFLOW__API_AUTH__JWT_SECRET": stack.local_secret("jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": stack.local_secret("api_secret_key"),
        "MLOPS_API_KEYS_FILE": str(api_key_file()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    endpoint = settings.storage.endpoint_url
    if endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
        connection = {"conn_type": "aws", "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        env.setdefault("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    if config.start_s3_endpoint:  # the local S3 API takes any credentials
        for name, value in (("AWS_ACCESS_KEY_ID", "production-profile"), ("AWS_SECRET_ACCESS_KEY", "local")):
            env[name] = os.environ.get(name, value)
        env["AWS_DEFAULT_REGION"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return env


# -------------------------------------------------------------------------------- backing services


def ensure_database(url: str) -> bool:
    """Create the PostgreSQL database ``url`` names when it is missing; True when it was created."""
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    params = {"host": parsed.host, "port": parsed.port or 5432, "user": parsed.username, "dbname": "postgres"}
    if parsed.password:
        params["password"] = parsed.password
    connection = psycopg2.connect(**params)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,))
            if cursor.fetchone():
                return False
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(parsed.database)))
            return True
    finally:
        connection.close()


def ensure_buckets(settings: Settings, names: list[str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=settings.storage.endpoint_url, region_name="us-east-1")
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for name in sorted(set(names) - existing):
        client.create_bucket(Bucket=name)


def redis_ping(url: str, timeout: float = 3.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout).ping())
    except redis.RedisError:
        return False


def postgres_ping(url: str) -> bool:
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    try:
        psycopg2.connect(
            host=parsed.host,
            port=parsed.port or 5432,
            user=parsed.username,
            dbname="postgres",
            connect_timeout=3,
        ).close()
        return True
    except psycopg2.OperationalError:
        return False


def backing_services_problem(settings: Settings) -> str | None:
    """Why the profile cannot start (PostgreSQL or Redis unreachable), or None."""
    config = profile(settings)
    if not postgres_ping(config.database_url):
        return f"PostgreSQL does not answer at {_host_port(config.database_url)}"
    if not redis_ping(config.broker_url):
        return f"Redis does not answer at {_host_port(config.broker_url)}"
    return None


def _host_port(url: str) -> str:
    parsed = urllib.parse.urlsplit(url.replace("+psycopg2", ""))
    return f"{parsed.hostname}:{parsed.port}"


# -------------------------------------------------------------------------------- the components


@dataclass(frozen=True)
class Component:
    """One long-running program of the profile: how to start it and how to know it is up."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    shown: str = ""


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        from ml.http import http

        try:
            return http("GET", url, timeout=3)[0] == 200
        except OSError:
            return False

    return probe


def log_says(name: str, text: str) -> Callable[[], bool]:
    def probe() -> bool:
        log = stack.airflow_home() / f"{name}.log"
        return log.exists() and text in log.read_text(errors="replace")

    return probe


def s3_component(settings: Settings) -> Component:
    parsed = urllib.parse.urlsplit(settings.storage.endpoint_url or "")
    argv = [bin_path("moto_server"), "-H", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 80)]
    shown = f"S3 API:      {parsed.geturl()}  (moto_server, this machine's stand-in for S3)"
    return Component("s3", argv, http_ok(f"{settings.storage.endpoint_url}/moto-api/"), shown=shown)


def mlflow_component(settings: Settings) -> Component:
    config = profile(settings)
    parsed = urllib.parse.urlsplit(settings.mlflow.tracking_uri or "")
    argv = [bin_path("mlflow"), "server", "--backend-store-uri", config.mlflow_backend_store]
    argv += ["--artifacts-destination", config.mlflow_artifacts, "--host", parsed.hostname or "127.0.0.1"]
    argv += ["--port", str(parsed.port or 5000), "--workers", "1"]
    store = _host_port(config.mlflow_backend_store)
    shown = (
        f"MLflow:      {settings.mlflow.tracking_uri}  (store {store}, artifacts {config.mlflow_artifacts})"
    )
    return Component("mlflow-server", argv, http_ok(f"{settings.mlflow.tracking_uri}/health"), shown=shown)


def airflow_components(settings: Settings) -> list[Component]:
    config = profile(settings)
    api = f"http://127.0.0.1:{config.api_port}"
    parts = [
        Component(
            "api-server",
            [bin_path("airflow"), "api-server", "--port", str(config.api_port), "--host", "127.0.0.1"],
            http_ok(f"{api}/api/v2/monitor/health"),
            shown=f"Airflow UI:  {api}  (admin; password in {stack.airflow_home() / stack.PASSWORDS_FILE})",
        ),
        Component(
            "scheduler",
            [bin_path("airflow"), "scheduler"],
            lambda: _health(api, "scheduler"),
            shown="scheduler:   CeleryExecutor, broker " + _host_port(config.broker_url),
        ),
        Component(
            "dag-processor", [bin_path("airflow"), "dag-processor"], lambda: _health(api, "dag_processor")
        ),
        Component("triggerer", [bin_path("airflow"), "triggerer"], lambda: _health(api, "triggerer")),
    ]
    for worker in config.workers:
        name = f"worker-{worker.name}"
        argv = [bin_path("airflow"), "celery", "worker", "--celery-hostname", f"{worker.name}@%h"]
        argv += ["--queues", ",".join(worker.queues), "--concurrency", str(worker.concurrency)]
        argv += ["--skip-serve-logs"]  # one machine: the API server reads task logs from the shared folder
        queues = ", ".join(worker.queues)
        shown = f"worker:      {worker.name} (queues {queues}; concurrency {worker.concurrency})"
        parts.append(Component(name, argv, log_says(name, " ready."), {WORKER_ENV: worker.name}, shown))
    return parts


def _health(api: str, part: str) -> bool:
    from ml.http import http

    try:
        status, body = http("GET", f"{api}/api/v2/monitor/health", timeout=3)
        return status == 200 and json.loads(body).get(part, {}).get("status") == "healthy"
    except (OSError, ValueError):
        return False


def replica_components(settings: Settings) -> list[Component]:
    config = profile(settings)
    return [
        Component(
            f"replica-{port}",
            [bin_path("mlops"), "serve", "--port", str(port)],
            http_ok(f"http://127.0.0.1:{port}/readyz"),
            shown=f"replica:     http://127.0.0.1:{port}  (follows {settings.storage.root}/serving/)",
        )
        for port in config.replica_ports
    ]


def start(components: list[Component], env: dict[str, str], wait_seconds: float) -> bool:
    """Start those of ``components`` that do not run, all at once (each waits for what it needs by
    itself: a worker for the broker, the scheduler for the database); True once every one is ready."""
    processes = {
        component.name: stack.spawn(component.name, component.argv, {**os.environ, **env, **component.env})
        for component in components
        if not stack.running_pid(component.name)
    }
    waiting = [component for component in components if component.name in processes]
    deadline = time.monotonic() + wait_seconds
    while waiting and time.monotonic() < deadline:
        for component in list(waiting):
            if component.ready():
                if component.shown:
                    print(component.shown, flush=True)
                waiting.remove(component)
            elif processes[component.name].poll() is not None:
                deadline = 0  # it exited: the profile cannot come up
        if waiting:
            time.sleep(1)
    for component in waiting:
        print(f"{component.name} did not become ready; see {stack.airflow_home() / f'{component.name}.log'}")
    return not waiting


# -------------------------------------------------------------------------------- up and down


def use_profile() -> Settings:
    """The profile's settings; AIRFLOW_HOME and MLOPS_CONFIG of this process set for everything it runs."""
    os.environ.setdefault("MLOPS_CONFIG", str(PROFILE_FILE))
    settings = load_settings()
    home = home_of(profile(settings))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ.update(profile_env(settings))
    return settings


def prepare(settings: Settings) -> None:
    """Databases and buckets, created when missing; Airflow's schema migrated."""
    config = profile(settings)
    urls = [config.database_url, config.mlflow_backend_store]
    if settings.tuning.storage_url and settings.tuning.storage_url.startswith("postgresql"):
        urls.append(settings.tuning.storage_url)
    for url in urls:
        if ensure_database(url):
            print(f"created database {url.rsplit('/', 1)[-1]}")
    if config.buckets:
        ensure_buckets(settings, config.buckets)
    migrated = stack.airflow_cli("db", "migrate")
    if migrated.returncode != 0:
        raise SystemExit(f"airflow db migrate failed:\n{migrated.stderr[-3000:]}")


def up(wait_seconds: float = 240.0) -> int:
    """The S3 API, databases and buckets, then MLflow and Airflow's parts at once, then the replicas;
    1 when one does not come up."""
    settings = use_profile()
    problem = backing_services_problem(settings)
    if problem:
        print(f"{problem}: start it (see the README's production profile section) and retry")
        return 1
    env = profile_env(settings)
    config = profile(settings)
    if config.start_s3_endpoint and not start([s3_component(settings)], env, 60):
        return 1
    prepare(settings)
    if not start([mlflow_component(settings), *airflow_components(settings)], env, wait_seconds):
        return 1
    still_paused = stack.unpause_dags(time.monotonic() + 120)
    if still_paused:
        print(f"could not unpause {sorted(still_paused)}; see {stack.airflow_home() / 'dag-processor.log'}")
        return 1
    return start_replicas(settings, env, wait_seconds)


def start_replicas(settings: Settings, env: dict[str, str], wait_seconds: float = 240.0) -> int:
    from ml import registry

    if registry.version_for_alias(settings, registry.CHAMPION) is None:
        print(
            "replicas:    not started (no champion yet; `make up PROFILE=production` after the first retrain)"
        )
        return 0
    return 0 if start(replica_components(settings), env, wait_seconds) else 1


def component_names(settings: Settings) -> list[str]:
    """Every component's name, in start order."""
    names = ["s3", "mlflow-server", *AIRFLOW_PARTS]
    names += [f"worker-{worker.name}" for worker in profile(settings).workers]
    return names + [f"replica-{port}" for port in profile(settings).replica_ports]


def stop_order(settings: Settings) -> list[list[str]]:
    """Every component, in the tiers they stop in: the replicas and workers first (stopping, they still
    write to S3, MLflow and the API server), then Airflow's parts, then MLflow and the S3 API."""
    replicas = [f"replica-{port}" for port in profile(settings).replica_ports]
    workers = [f"worker-{worker.name}" for worker in profile(settings).workers]
    return [replicas + workers, list(AIRFLOW_PARTS), ["mlflow-server", "s3"]]


def stop_timed(name: str, wait_seconds: float) -> str | None:
    """Stop one component: ``name (seconds)``, or None when it was not running."""
    started = time.monotonic()
    if stack.stop_group(name, wait_seconds):
        return f"{name} ({time.monotonic() - started:.1f} s)"
    return None


def down(wait_seconds: float = 30.0) -> int:
    """Stop every component, a tier of ``stop_order`` at a time, the components of a tier at once."""
    settings = use_profile()
    stopped: list[str] = []
    for tier in stop_order(settings):
        with ThreadPoolExecutor(len(tier)) as pool:
            stopped += [
                found for found in pool.map(lambda name: stop_timed(name, wait_seconds), tier) if found
            ]
    print(f"stopped {', '.join(stopped)}" if stopped else "not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    command = (argv or sys.argv[1:] or ["up"])[0]
    if command not in ("up", "down"):
        print("usage: python -m ml.ops.production up|down", file=sys.stderr)
        return 2
    return up() if command == "up" else down()


if __name__ == "__main__":
    raise SystemExit(main())
