"""Links a person can open: presigned S3 URLs, the stack's report server, and alerts that carry them."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import jinja2
import pytest

from ml.alerts import Alert, env_senders, mlflow_run_url, route
from ml.http import free_port
from ml.monitoring.drift import drift_alert
from ml.ops import stack
from ml.storage import LocalStorage, S3Storage, browsable_link, browsable_url
from tests.conftest import REPO, setting_overrides
from tests.receivers import connect_alerts

pytestmark = pytest.mark.integration
REPORT = "reports/drift/2026-01-05/report.html"
PAGE = b"<html><body>drift report 2026-01-05</body></html>"
LOG_URL = "http://localhost:8080/dags/ingest_daily/runs/manual__1/tasks/ingest?try_number=1"


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_get(port: int, path: str) -> int:
    """A GET with the path sent exactly as written (urllib would not keep ``..`` as it is)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


# -- S3: presigned links against a real S3 endpoint (moto_server on 127.0.0.1) ---------------------


def test_a_presigned_link_opens_the_object_and_carries_its_expiry(
    s3_endpoint, s3_bucket, make_settings
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    storage = S3Storage(client, s3_bucket, "mlops")
    storage.write_bytes(REPORT, PAGE)
    settings = make_settings(storage__root=f"s3://{s3_bucket}/mlops")

    url = browsable_url(storage, REPORT, settings)
    assert url.startswith(f"{s3_endpoint}/{s3_bucket}/mlops/{REPORT}?")
    assert fetch(url) == (200, PAGE)  # no credentials: the signature in the query is the permission
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["604800"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert browsable_link(storage, storage.url(REPORT), settings).startswith(url.split("?")[0])

    short = browsable_url(
        storage, REPORT, make_settings(storage__root="s3://x", storage__link_expiry_seconds=1)
    )
    assert parse_qs(urlsplit(short).query)["X-Amz-Expires"] == ["1"]  # S3 refuses it after 1 s


# -- local roots: the stack's report server ---------------------------------------------------------


@pytest.fixture(scope="module")
def reports_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStorage, int]]:
    """``stack.start_reports`` as ``make up`` starts it (own process group), on a free port."""
    root = tmp_path_factory.mktemp("store")
    storage = LocalStorage(root)
    storage.write_bytes(REPORT, PAGE)
    storage.write_bytes("reports/data_docs/2026-01-05/index.html", b"<html>docs</html>")
    storage.write_bytes("catalog/secret.json", b"{}")
    (root / "reports" / "escape").symlink_to(root / "catalog")
    port = free_port()
    env = {"MLOPS__STORAGE__ROOT": str(root), "MLOPS__REPORTS__PORT": str(port)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            assert stack.start_reports(wait_seconds=30) == 0
            assert stack.running_pid("reports")
            yield storage, port
        finally:
            stack.stop_group("reports", wait_seconds=5)
    assert stack.running_pid("reports") is None


def test_the_report_server_serves_a_report_at_its_browsable_url(reports_server, make_settings) -> None:
    storage, port = reports_server
    settings = make_settings(reports__port=port)
    url = browsable_url(storage, REPORT, settings)
    assert url == f"http://127.0.0.1:{port}/{REPORT}"
    assert fetch(url) == (200, PAGE)
    assert browsable_link(storage, storage.url(REPORT), settings) == url  # a file:// URL in an error
    status, body = fetch(f"http://127.0.0.1:{port}/reports/data_docs/2026-01-05/")
    assert (status, body) == (200, b"<html>docs</html>")  # a folder serves its index.html
    assert browsable_url(storage, "catalog/secret.json", settings) == storage.url("catalog/secret.json")
    public = make_settings(reports__url="https://reports.example.org/")
    assert browsable_url(storage, REPORT, public) == f"https://reports.example.org/{REPORT}"


@pytest.mark.parametrize(
    "path",
    [
        "/reports/../catalog/secret.json",
        "/reports/%2e%2e/catalog/secret.json",
        "/reports/..%2fcatalog%2fsecret.json",
        "/reports/drift/../../catalog/secret.json",
        "/catalog/secret.json",
        "//etc/passwd",
        "/reports/escape/secret.json",  # a symlink inside reports/ that leads out of it
    ],
)
def test_the_report_server_refuses_anything_outside_reports(reports_server, path: str) -> None:
    _, port = reports_server
    assert raw_get(port, path) == 403
    assert raw_get(port, f"/{REPORT}") == 200


# -- alerts carry the links: Slack Block Kit and PagerDuty ``links`` --------------------------------


def linked_alert(settings, url: str, severity: str = "critical") -> Alert:
    summary = {
        "reasons": ["share of drifted columns 0.6 > 0.3"],
        "retrain": {"why": "requested"},
        "day": "2026-01-05",
        "drift_score": 0.6,
        "prediction_kl": 0.2,
    }
    alert = drift_alert(summary, url, mlflow_run_url(settings, "0123abcd", "7"))
    return Alert(
        **{**alert.__dict__, "severity": severity, "log_url": LOG_URL, "reason": alert.reason + " <!here>"}
    )


def assert_block_kit(message: dict, links: dict[str, str]) -> None:
    blocks = message["blocks"]
    assert [block["type"] for block in blocks] == ["header", "section", "actions", "context"]
    assert "data_drift_detected" in blocks[0]["text"]["text"]
    fields = [field["text"] for field in blocks[1]["fields"]]
    assert fields == ["*DAG*\ndrift_monitor", "*Task*\nmeasure", "*Date*\n2026-01-05"]
    assert "&lt;!here&gt;" in blocks[1]["text"]["text"]  # a reason cannot ping the channel
    buttons = {button["text"]["text"]: button["url"] for button in blocks[2]["elements"]}
    assert buttons == links
    assert all(url in message["text"] for url in links.values())  # the text fallback names them too


def test_slack_gets_block_kit_buttons_and_pagerduty_gets_links(
    monkeypatch, receiver, reports_server, make_settings
) -> None:
    from mlops_airflow.alerts import send_alert

    storage, port = reports_server
    settings = make_settings(reports__port=port)
    report = browsable_url(storage, REPORT, settings)
    alert = linked_alert(settings, report)
    links = {
        "Report": report,
        "Airflow log": LOG_URL,
        "MLflow run": "http://127.0.0.1:5000/#/experiments/7/runs/0123abcd",
    }
    connect_alerts(monkeypatch, receiver.url)
    assert send_alert(alert, settings) == {"slack": "sent", "pagerduty": "sent"}  # the providers' path
    assert route(alert, settings, env_senders(settings)) == {
        "slack": "sent",
        "pagerduty": "sent",
    }  # the CLI's
    slack = receiver.on("/slack/")
    assert len(slack) == 2
    for message in slack:
        assert_block_kit(message.json(), links)
        assert fetch(message.json()["blocks"][2]["elements"][0]["url"]) == (200, PAGE)  # the button opens
    for event in receiver.on("/v2/enqueue"):
        body = event.json()
        assert body["links"] == [{"href": url, "text": label} for label, url in links.items()]
        assert body["payload"]["custom_details"]["log_url"] == LOG_URL


def test_a_link_slack_cannot_open_is_shown_not_buttoned(monkeypatch, receiver, make_settings) -> None:
    settings = make_settings()
    connect_alerts(monkeypatch, receiver.url)
    alert = Alert("x", "warning", "y", link="s3://bucket/reports/a.html")
    assert route(alert, settings, env_senders(settings)) == {"slack": "sent"}
    blocks = receiver.on("/slack/")[0].json()["blocks"]
    assert "actions" not in [block["type"] for block in blocks]
    assert "Report: `s3://bucket/reports/a.html`" in blocks[-1]["elements"][0]["text"]


def test_a_failure_callback_links_the_report_and_the_task_log(
    monkeypatch, receiver, reports_server, tmp_path: Path
) -> None:
    """The DAGs' on_failure_callback: a Data Docs file:// URL in the error becomes the server's link."""
    from mlops_airflow.alerts import failure_callback

    storage, port = reports_server
    for name, value in setting_overrides(storage__root=storage.root, reports__port=port).items():
        monkeypatch.setenv(name, value)
    connect_alerts(monkeypatch, receiver.url)

    class TI:
        dag_id, task_id, log_url = "ingest_daily", "ingest", LOG_URL

    docs = storage.url("reports/data_docs/2026-01-05/index.html")
    failure_callback({"ti": TI(), "exception": RuntimeError(f"rejected. Data Docs: {docs}"), "params": {}})
    (message,) = receiver.wait_for("/slack/")
    buttons = {b["text"]["text"]: b["url"] for b in message.json()["blocks"][2]["elements"]}
    assert buttons == {
        "Report": f"http://127.0.0.1:{port}/reports/data_docs/2026-01-05/index.html",
        "Airflow log": LOG_URL,
    }
    assert fetch(buttons["Report"]) == (200, b"<html>docs</html>")


def test_a_failure_callback_on_s3_links_a_presigned_report(
    monkeypatch, receiver, s3_endpoint, s3_bucket
) -> None:
    """The same callback on an S3 root: presigned through the Airflow connection's client (S3Hook)."""
    from mlops_airflow.alerts import failure_callback

    aws = {"login": "testing", "password": "testing", "extra": {"endpoint_url": s3_endpoint}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", **aws}))
    monkeypatch.setenv("MLOPS__STORAGE__ROOT", f"s3://{s3_bucket}/mlops")
    connect_alerts(monkeypatch, receiver.url)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    S3Storage(client, s3_bucket, "mlops").write_bytes("reports/data_docs/d/index.html", b"<html>s3</html>")

    class TI:
        dag_id, task_id, log_url = "ingest_daily", "ingest", LOG_URL

    error = RuntimeError(f"rejected. Data Docs: s3://{s3_bucket}/mlops/reports/data_docs/d/index.html")
    failure_callback({"ti": TI(), "exception": error})
    (message,) = receiver.wait_for("/slack/")
    report = message.json()["blocks"][2]["elements"][0]["url"]
    assert report.startswith(f"{s3_endpoint}/{s3_bucket}/mlops/reports/data_docs/d/index.html?X-Amz-")
    assert fetch(report) == (200, b"<html>s3</html>")


def test_a_failed_dag_run_alerts_with_its_task_log_link(airflow_db, monkeypatch, receiver, tmp_path) -> None:
    """A real DAG run (rollback, dag.test) that fails: the callback's alert links the task's log page."""
    import datetime as dt

    from airflow.dag_processing.dagbag import DagBag

    for name, value in setting_overrides(
        storage__root=tmp_path / "store", mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
    ).items():
        monkeypatch.setenv(name, value)
    connect_alerts(monkeypatch, receiver.url)
    dag = DagBag(dag_folder=str(REPO / "dags" / "rollback.py")).dags["rollback"]
    run = dag.test(logical_date=dt.datetime(2026, 1, 5, tzinfo=dt.UTC), run_conf={"reason": "probe"})
    assert run.state == "failed"  # nothing is deployed: nothing to roll back
    (message,) = receiver.wait_for("/slack/")
    body = message.json()
    assert "nothing is deployed" in body["blocks"][1]["text"]["text"]
    (button,) = body["blocks"][2]["elements"]
    assert button["text"]["text"] == "Airflow log"
    assert button["url"].startswith("http://localhost:8080/dags/rollback/runs/")
    assert button["url"].split("?")[0].endswith("/tasks/roll_back")
    assert "Airflow log: http" in body["text"]


def test_the_approval_form_shows_openable_links() -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags" / "retrain.py")).dags["retrain"]

    class TI:
        def xcom_pull(self, task_ids: str) -> dict:
            return {
                "model_version": "3",
                "dataset_version": "d",
                "gate": {"passed": True},
                "validation": {"model_card": "mlflow-artifacts:/7/r/artifacts/validation/model_card.md"},
                "links": {"MLflow run": "http://127.0.0.1:5000/#/experiments/7/runs/r"},
                "tuned": {},
            }

    body = jinja2.Template(dag.get_task("approve").body).render(ti=TI())
    assert "[Open the MLflow run](http://127.0.0.1:5000/#/experiments/7/runs/r)" in body
    assert "mlflow-artifacts:/7/r/artifacts/validation/model_card.md" in body  # the machine URI stays


def test_the_approval_links_name_the_run_its_model_card_and_the_drift_report(
    reports_server, tmp_path: Path
) -> None:
    from ml.config import load_settings
    from ml.release.links import approval_links

    storage, port = reports_server
    env = setting_overrides(mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", reports__port=port)
    settings = load_settings(environ={**env, "MLOPS__STORAGE__ROOT": str(storage.root)})
    result = {"run_id": "0123abcd", "validation": {"model_card": "mlflow-artifacts:/1/0123abcd/artifacts/x"}}
    links = approval_links(settings, storage, result, storage.url(REPORT))
    run = "http://127.0.0.1:5000/#/experiments/1/runs/0123abcd"
    assert links == {
        "MLflow run": run,
        "model card": f"{run}/artifactPath/validation/model_card.md",
        "drift report": f"http://127.0.0.1:{port}/{REPORT}",
    }
    assert fetch(links["drift report"]) == (200, PAGE)
    assert approval_links(settings, storage, {"status": "skipped"}) == {}
