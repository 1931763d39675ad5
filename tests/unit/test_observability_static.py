"""Static checks of the observability stack in docker/ (no Docker engine here): Prometheus scrapes compose
services, files compose mounts exist, Grafana provisioning and the dashboard agree, and every metric a panel
or alert rule queries is one that the service, BentoML or the StatsD mapping of Airflow's metrics exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
MAPPING = DOCKER / "statsd" / "mapping.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mlops.json"
SERVICE_SOURCE = REPO / "bentos" / "service.py"

# BentoML 1.4's own metrics (namespace bentoml_service: _bentoml_impl/server/app.py and
# bentoml/_internal/server/http/instruments.py).
BENTOML_METRICS = {
    "bentoml_service_request_total",
    "bentoml_service_request_duration_seconds_bucket",
    "bentoml_service_request_duration_seconds_sum",
    "bentoml_service_request_duration_seconds_count",
    "bentoml_service_request_in_progress",
    "bentoml_service_last_request_timestamp_seconds",
    "bentoml_service_adaptive_batch_size_bucket",
    "bentoml_service_adaptive_batch_size_sum",
    "bentoml_service_adaptive_batch_size_count",
}
PROMETHEUS_METRICS = {"up"}  # set by Prometheus for every target

PROMQL_AGGREGATIONS = "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk"
PROMQL_FUNCTIONS = {
    *PROMQL_AGGREGATIONS.split(),
    "limit_ratio",
    *"""abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week
    day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum hour idelta increase irate label_join
    label_replace ln log2 log10 minute month predict_linear rate resets round scalar sgn sort sort_desc
    sort_by_label sort_by_label_desc sqrt time timestamp vector year avg_over_time min_over_time
    max_over_time sum_over_time count_over_time quantile_over_time stddev_over_time stdvar_over_time
    last_over_time present_over_time mad_over_time start end""".split(),
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
PROMQL_KEYWORDS |= {"unless", "offset", "inf", "nan"}

# statsd_exporter's own validation (pkg/mapper/mapper.go).
STATSD_GLOB_RE = re.compile(r"^(\*\.|[a-zA-Z_](-?[a-zA-Z0-9_])+\.)+(\*|[a-zA-Z_](-?[a-zA-Z0-9_])+)$")
PROM_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]+$")
CAPTURE_RE = re.compile(r"\$\{?(\d+)\}?")


# ---------------------------------------------------------------- helpers


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _yaml(COMPOSE)["services"]


def _listening(service: dict[str, Any]) -> set[str]:
    """The container ports a compose service declares ("3000/tcp", "9125/udp"), published or exposed."""
    ports = set()
    for entry in [*service.get("ports", []), *service.get("expose", [])]:
        port, _, proto = str(entry).partition("/")
        ports.add(f"{port.rsplit(':', 1)[-1]}/{proto or 'tcp'}")
    return ports


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative paths are relative to docker/)."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type") == "bind":
                mounts[entry["target"]] = (DOCKER / entry["source"]).resolve()
            continue
        source, target, *_ = str(entry).split(":")
        if source.startswith((".", "/")):
            mounts[target] = (DOCKER / source).resolve()
    return mounts


def _host_port(address: str) -> tuple[str, str]:
    match = re.fullmatch(r"(?:https?://)?([\w.-]+):(\d+)(?:/.*)?", address)
    assert match, f"{address!r} is not host:port"
    return match.group(1), match.group(2)


def _assert_compose_endpoint(address: str, proto: str = "tcp") -> str:
    host, port = _host_port(address)
    services = _services()
    assert host in services, f"{address}: {host} is not a compose service"
    assert f"{port}/{proto}" in _listening(services[host]), f"{address}: {host} declares no {port}/{proto}"
    return host


def _option(command: list[str], flag: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{flag}=")]
    assert len(values) == 1, f"{flag} not set once in {command}"
    return values[0]


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All panels, those nested in (collapsed) rows included."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def _provisioned_datasource() -> dict[str, Any]:
    (source,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    return source


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) a PromQL expression uses; label names and values, durations, Grafana
    variables and keywords are left out."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)  # Grafana variables ($__range, ${var})
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if call:
            functions.add(name)
        elif name.lower() not in PROMQL_KEYWORDS:
            metrics.add(name)
    return metrics, functions


def service_metrics() -> set[str]:
    """Series names the metrics defined in bentos/service.py export (prometheus_client naming)."""
    names = set()
    source = SERVICE_SOURCE.read_text()
    for kind, name in re.findall(
        r"\b(Histogram|Counter|Gauge|Summary)\(\s*[\"']([A-Za-z_:][\w:]*)[\"']", source
    ):
        if kind == "Histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "Counter":
            names.add(f"{name.removesuffix('_total')}_total")
        elif kind == "Summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def _mappings() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = _yaml(MAPPING)
    return config.get("defaults", {}), config["mappings"]


def mapping_metrics() -> set[str]:
    """Series names the StatsD mapping produces: counters and gauges keep the name as written; timers
    (observers) become histograms (_bucket/_sum/_count) or summaries (name, _sum, _count)."""
    defaults, mappings = _mappings()
    names = set()
    for mapping in mappings:
        if mapping.get("action", "map") == "drop":
            continue
        name = mapping["name"]
        if mapping.get("match_metric_type") == "observer":
            if mapping.get("observer_type", defaults.get("observer_type", "summary")) == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names |= {name, f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def _rule_for(name: str, metric_type: str) -> tuple[dict[str, Any], list[str]] | None:
    """The mapping rule statsd_exporter applies to a StatsD metric (glob rules, first match wins) and the
    segments its wildcards capture, or None when no rule matches."""
    _, mappings = _mappings()
    segments = name.split(".")
    for mapping in mappings:
        assert mapping.get("match_type", "glob") == "glob", "only glob rules are simulated here"
        wanted = mapping.get("match_metric_type")
        pattern = mapping["match"].split(".")
        if (wanted and wanted != metric_type) or len(pattern) != len(segments):
            continue
        pairs = list(zip(pattern, segments, strict=True))
        if all(pat in ("*", seg) for pat, seg in pairs):
            return mapping, [seg for pat, seg in pairs if pat == "*"]
    return None


def map_statsd(name: str, metric_type: str) -> tuple[str, dict[str, str]] | None:
    """What statsd_exporter makes of a StatsD metric: ("<drop>", {}), (name, labels), or None (unmapped)."""
    found = _rule_for(name, metric_type)
    if found is None:
        return None
    mapping, captures = found
    if mapping.get("action") == "drop":
        return "<drop>", {}

    def expand(value: Any) -> str:
        return CAPTURE_RE.sub(lambda group: captures[int(group.group(1)) - 1], str(value))

    return expand(mapping["name"]), {
        key: expand(value) for key, value in (mapping.get("labels") or {}).items()
    }


def _airflow_registry() -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("airflow")  # finds the package without importing (configuring) it
    for location in (spec.submodule_search_locations or []) if spec else []:
        registry = Path(location) / "_shared" / "observability" / "metrics" / "metrics_template.yaml"
        if registry.is_file():
            return _yaml(registry)["metrics"]
    pytest.skip("Airflow's metrics registry (metrics_template.yaml) is not installed")


# ---------------------------------------------------------------- compose and Prometheus


def test_prometheus_config_is_valid_and_every_target_is_a_compose_service_port() -> None:
    config = _yaml(PROMETHEUS)
    assert re.fullmatch(r"\d+[smh]", config["global"]["scrape_interval"])
    jobs = config["scrape_configs"]
    names = [job["job_name"] for job in jobs]
    assert len(names) == len(set(names)), f"duplicate job names: {names}"
    targets = set()
    for job in jobs:
        assert job.get("metrics_path", "/metrics").startswith("/"), job["job_name"]
        assert job.get("scheme", "http") == "http", job["job_name"]
        assert job["static_configs"], job["job_name"]
        for static in job["static_configs"]:
            assert isinstance(static["targets"], list) and static["targets"], job["job_name"]
            for target in static["targets"]:
                _assert_compose_endpoint(target)
                targets.add(target)
    assert {"service:3000", "statsd-exporter:9102", "prometheus:9090"} <= targets


def test_prometheus_scrapes_the_service_with_a_bearer_key_the_service_accepts_as_admin() -> None:
    (job,) = [job for job in _yaml(PROMETHEUS)["scrape_configs"] if job["job_name"] == "prediction-service"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth  # no key in the file
    compose = _yaml(COMPOSE)
    mounted = {f"/run/secrets/{name}": name for name in _services()["prometheus"].get("secrets", [])}
    secret = mounted.get(auth["credentials_file"])
    assert secret, f"{auth['credentials_file']} is not a compose secret mounted into prometheus"
    variable = compose["secrets"][secret]["environment"]
    service_keys = _services()["service"]["environment"]["MLOPS_API_KEYS"].split(",")
    assert any(entry.startswith(f"${{{variable}:") and entry.endswith(":admin") for entry in service_keys)


def test_prometheus_loads_its_config_and_rules_from_mounted_repository_files() -> None:
    prometheus = _services()["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_path = _option(prometheus["command"], "--config.file")
    assert mounts.get(config_path) == PROMETHEUS.resolve(), (
        f"{config_path} is not docker/prometheus/prometheus.yml"
    )
    rule_files = _yaml(PROMETHEUS)["rule_files"]
    assert rule_files
    for rule_file in rule_files:  # relative to the config file's folder, in the container as in the repo
        in_container = rule_file if rule_file.startswith("/") else f"{Path(config_path).parent}/{rule_file}"
        assert in_container in mounts, f"rule file {in_container} is not mounted"
        assert mounts[in_container].is_file()
        if not rule_file.startswith("/"):
            assert mounts[in_container] == (PROMETHEUS.parent / rule_file).resolve()


def test_every_file_compose_mounts_exists() -> None:
    checked = 0
    for name, service in _services().items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted on {target}) does not exist"
            assert source.is_relative_to(REPO), f"{name} mounts {source} from outside the repository"
            checked += 1
    assert checked >= 5  # statsd mapping, prometheus config + rules, grafana provisioning + dashboards


def test_airflow_sends_statsd_to_the_exporter_and_tracks_to_the_mlflow_service() -> None:
    services = _services()
    airflow = {name: service for name, service in services.items() if name.startswith("airflow-")}
    assert airflow
    exporter = services["statsd-exporter"]
    assert (
        _bind_mounts(exporter)[_option(exporter["command"], "--statsd.mapping-config")] == MAPPING.resolve()
    )
    udp_port = _option(exporter["command"], "--statsd.listen-udp").rsplit(":", 1)[-1]
    web_port = _option(exporter["command"], "--web.listen-address").rsplit(":", 1)[-1]
    assert {f"{udp_port}/udp", f"{web_port}/tcp"} <= _listening(exporter)
    prefixes = {mapping["match"].split(".")[0] for mapping in _mappings()[1]}
    mlflow_env = services["mlflow"]["environment"]
    allowed_hosts = mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for name, service in airflow.items():
        env = service["environment"]
        assert str(env["AIRFLOW__METRICS__STATSD_ON"]).lower() == "true", name
        host = _assert_compose_endpoint(
            f"{env['AIRFLOW__METRICS__STATSD_HOST']}:{env['AIRFLOW__METRICS__STATSD_PORT']}", "udp"
        )
        assert host == "statsd-exporter" and str(env["AIRFLOW__METRICS__STATSD_PORT"]) == udp_port, name
        assert prefixes == {env["AIRFLOW__METRICS__STATSD_PREFIX"]}, f"{name}: mapping is for {prefixes}"
        assert "statsd-exporter" in service["depends_on"], f"{name} may start before the exporter resolves"
        uri = env["MLOPS__MLFLOW__TRACKING_URI"]
        assert _assert_compose_endpoint(uri) == "mlflow", name
        assert "{}:{}".format(*_host_port(uri)) in allowed_hosts, f"MLflow would refuse the Host of {uri}"


def test_mlflow_keeps_artifacts_in_minio_and_runs_in_postgres() -> None:
    mlflow = _services()["mlflow"]
    env = mlflow["environment"]
    assert _assert_compose_endpoint(env["MLFLOW_S3_ENDPOINT_URL"]) == "minio"
    assert re.fullmatch(
        r"postgresql\+psycopg2://\w+:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres:5432/mlflow",
        env["MLFLOW_BACKEND_STORE_URI"],
    )
    assert "--artifacts-destination s3://mlflow" in " ".join(mlflow["command"])
    installed = re.search(r"^mlflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert installed and mlflow["image"].startswith(f"ghcr.io/mlflow/mlflow:v{installed.group(1)}")


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus() -> None:
    grafana = _services()["grafana"]
    mounts = _bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    for provider in providers:
        path = provider["options"]["path"]
        assert path in mounts, f"dashboard provider path {path} is not mounted into grafana"
        assert (mounts[path] / DASHBOARD.name).is_file() and mounts[path] == DASHBOARD.parent.resolve()
    source = _provisioned_datasource()
    assert source["type"] == "prometheus" and source["uid"]
    assert _assert_compose_endpoint(source["url"]) == "prometheus"
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"


# ---------------------------------------------------------------- dashboard and alert rules


def test_dashboard_is_a_grafana_model_on_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and 36 <= dashboard["schemaVersion"] <= 41
    uid = _provisioned_datasource()["uid"]
    panels = _panels(dashboard["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    queries = [panel for panel in panels if panel["type"] != "row"]
    assert len(queries) >= 8
    for panel in queries:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", {"uid": uid})["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize(
    ("expr", "metrics", "functions"),
    [
        (
            'histogram_quantile(0.99, sum by (le, version) (rate(a_bucket{code=~"5..", x="y z"}[5m]))) > 1',
            {"a_bucket"},
            {"histogram_quantile", "sum", "rate"},
        ),
        (
            "sum(rate(b_total[$__range])) / sum without (job) (c) or vector(0)",
            {"b_total", "c"},
            {"sum", "rate", "vector"},
        ),
        ('up{job="x"} == 0 offset 5m unless on (instance) d:recorded', {"up", "d:recorded"}, set()),
    ],
)
def test_promql_names_finds_metrics_and_functions_only(
    expr: str, metrics: set[str], functions: set[str]
) -> None:
    assert promql_names(expr) == (metrics, functions)


def test_the_service_metrics_are_read_from_its_source() -> None:
    assert {
        "mlops_prediction_latency_seconds_bucket",
        "mlops_predictions_total",
        "mlops_request_errors_total",
        "mlops_prediction_log_dropped_total",
        "mlops_model_batch_images_count",
        "mlops_model_batch_images_sum",
    } <= service_metrics()


def test_every_metric_a_panel_or_alert_queries_is_exported_by_something_in_the_stack() -> None:
    known = service_metrics() | BENTOML_METRICS | mapping_metrics() | PROMETHEUS_METRICS
    exprs = _dashboard_exprs() + [rule["expr"] for rule in _alert_rules()]
    used: set[str] = set()
    for expr in exprs:
        metrics, functions = promql_names(expr)
        assert metrics, f"no metric in {expr!r}"
        assert metrics <= known, f"unknown metric(s) {sorted(metrics - known)} in {expr!r}"
        assert functions <= PROMQL_FUNCTIONS, f"unknown function(s) {sorted(functions - PROMQL_FUNCTIONS)}"
        used |= metrics
    dashboard_used = set().union(*(promql_names(expr)[0] for expr in _dashboard_exprs()))
    assert {
        "mlops_prediction_latency_seconds_bucket",
        "mlops_predictions_total",
        "mlops_request_errors_total",
        "mlops_model_batch_images_sum",
        "bentoml_service_request_total",
        "airflow_dagrun_duration_seconds_count",
        "airflow_ti_finish_total",
        "airflow_scheduler_heartbeat_total",
    } <= dashboard_used


def test_alert_rules_mirror_the_product_thresholds() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
    latency = [r for r in rules.values() if "mlops_prediction_latency_seconds_bucket" in r["expr"]]
    assert len(latency) == 1 and "histogram_quantile(0.99," in latency[0]["expr"]
    product = [
        rule for rule in _yaml(REPO / "params.yaml")["alerts"]["rules"] if rule["metric"] == "p99_latency_ms"
    ]
    if product:  # the product's own rule (Airflow) is the reference
        threshold = re.search(r">\s*([\d.]+)\s*$", latency[0]["expr"])
        assert threshold and float(threshold.group(1)) * 1000 == product[0]["threshold"]
        assert latency[0]["labels"]["severity"] == product[0]["severity"]
    errors = [r for r in rules.values() if 'http_response_code=~"5.."' in r["expr"]]
    assert len(errors) == 1 and re.search(r">\s*0\.05\s*$", errors[0]["expr"])
    assert errors[0]["labels"]["severity"] == "critical"


# ---------------------------------------------------------------- StatsD mapping


def test_statsd_mapping_is_valid_for_statsd_exporter() -> None:
    defaults, mappings = _mappings()
    assert defaults.get("match_type", "glob") == "glob"
    kinds: dict[str, tuple[str, frozenset[str]]] = {}
    for mapping in mappings:
        match = mapping["match"]
        assert STATSD_GLOB_RE.match(match), f"not a valid glob: {match}"
        if mapping.get("action", "map") == "drop":
            assert "*" not in match and not mapping.get("labels"), match
            continue
        name, kind, labels = mapping["name"], mapping.get("match_metric_type"), mapping.get("labels") or {}
        assert PROM_NAME_RE.match(name), name
        assert kind in {"counter", "gauge", "observer"}, f"{match}: set match_metric_type"
        assert name.endswith("_total") == (kind == "counter"), f"{name}: only counters end in _total"
        if kind == "observer":
            assert name.endswith("_seconds"), f"{name}: timers are exported in seconds"
        for label, value in labels.items():
            assert LABEL_NAME_RE.match(label), label
            for index in CAPTURE_RE.findall(str(value)):
                assert 1 <= int(index) <= match.count("*"), f"{match}: ${index} has no wildcard"
        assert match.count("*") == len(labels), f"{match}: every wildcard becomes a label"
        signature = (kind, frozenset(labels))
        assert kinds.setdefault(name, signature) == signature, f"{name}: one type and label set per name"


@pytest.mark.parametrize(
    ("statsd_name", "metric_type", "expected"),
    [
        (
            "airflow.ti.finish.retrain.train_model.failed",
            "counter",
            ("airflow_ti_finish_total", {"dag_id": "retrain", "task_id": "train_model", "state": "failed"}),
        ),
        (
            "airflow.ti.finish.retrain.checks__golden.success",
            "counter",
            (
                "airflow_ti_finish_total",
                {"dag_id": "retrain", "task_id": "checks__golden", "state": "success"},
            ),
        ),
        (
            "airflow.dagrun.duration.failed.drift_monitor",
            "observer",
            ("airflow_dagrun_duration_seconds", {"status": "failed", "dag_id": "drift_monitor"}),
        ),
        ("airflow.scheduler_heartbeat", "counter", ("airflow_scheduler_heartbeat_total", {})),
        ("airflow.dag_processing.import_errors", "gauge", ("airflow_dag_processing_import_errors", {})),
        (
            "airflow.executor.running_tasks.LocalExecutor",
            "gauge",
            ("airflow_executor_running_tasks", {"executor": "LocalExecutor"}),
        ),
        ("airflow.ti.finish", "counter", ("<drop>", {})),
        ("airflow.dagrun.duration.success", "observer", ("<drop>", {})),
        ("airflow.scheduler.tasks.killed_externally", "counter", None),
    ],
)
def test_statsd_mapping_turns_airflow_names_into_labels(
    statsd_name: str, metric_type: str, expected: tuple[str, dict[str, str]] | None
) -> None:
    assert map_statsd(statsd_name, metric_type) == expected


def test_statsd_mapping_follows_the_installed_airflow_metrics_registry() -> None:
    """Every rule matches a metric Airflow really sends, with its type; drop rules only drop the bare name
    of a metric whose legacy name (with its variables) is sent too."""
    kinds = {"counter": "counter", "gauge": "gauge", "timer": "observer"}
    sent = []  # (statsd name, type, has a legacy name) as Airflow sends them with statsd_prefix=airflow
    for metric in _airflow_registry():
        kind, legacy = kinds[metric["type"]], metric.get("legacy_name", "-")
        if "{" not in metric["name"]:
            sent.append((f"airflow.{metric['name']}", kind, legacy != "-"))
        if legacy != "-":  # each variable is one segment: Airflow writes a "." in a value as "__"
            sent.append(("airflow." + re.sub(r"\{(\w+)\}", r"\1", legacy), kind, False))
    assert len(sent) > 50
    hits: dict[str, list[bool]] = {}
    for name, kind, has_legacy in sent:
        found = _rule_for(name, kind)
        if found:
            hits.setdefault(found[0]["match"], []).append(has_legacy)
    for mapping in _mappings()[1]:
        assert mapping["match"] in hits, f"{mapping['match']} matches no metric Airflow sends (with its type)"
        if mapping.get("action") == "drop":
            assert all(hits[mapping["match"]]), f"{mapping['match']} drops a metric sent under no other name"


# ---------------------------------------------------------------- promtool (optional)


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_config_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    run = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    recording = [
        {"record": f"dashboard:query_{index}", "expr": re.sub(r"\$__\w+", "1h", expr)}
        for index, expr in enumerate(_dashboard_exprs())
    ]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    run = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
