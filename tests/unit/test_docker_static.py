"""Static checks of docker/ (no Docker engine here): referenced files exist, images pinned, no secrets."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def test_dockerfile_copies_only_what_exists_and_pins_its_base() -> None:
    text = (DOCKER / "Dockerfile.airflow").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest")
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _target = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} does not exist"
    assert "USER airflow" in text


def test_compose_services_build_pinned_images_and_take_secrets_from_the_environment() -> None:
    text = (DOCKER / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "minio", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"} <= set(
        services
    )
    for name, service in services.items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, name
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    secrets = re.findall(r"^\s*\w*(?:PASSWORD|SECRET)\w*:\s*(\S+)", text, re.M)
    assert len(secrets) >= 4
    for match in secrets:
        assert match.startswith("${"), f"a password is written into the compose file: {match}"


def test_the_service_container_fails_closed_and_gets_its_keys_and_secret_from_the_environment() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    env = compose["services"]["service"]["environment"]
    assert env["MLOPS__SERVING__HOST"] == "0.0.0.0"  # beyond loopback: no key, no start
    keys = env["MLOPS_API_KEYS"].split(",")
    assert keys[0].startswith("${MLOPS_API_KEYS:?") and keys[-1].startswith("${MLOPS_METRICS_KEY:?")
    assert keys[-1].endswith("}:admin")  # Prometheus's key may read /metrics and nothing else
    assert env["MLOPS_FEEDBACK_SECRET"].startswith("${MLOPS_FEEDBACK_SECRET:?")


def test_the_service_and_airflow_share_one_s3_root_so_deploys_reach_the_service() -> None:
    """The pipeline's deploy writes serving/state.json under storage.root; the service follows it."""
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    service_env = compose["services"]["service"]["environment"]
    airflow_env = compose["services"]["airflow-scheduler"]["environment"]  # the tasks deploy from here
    assert service_env["MLOPS__STORAGE__ROOT"] == airflow_env["MLOPS__STORAGE__ROOT"]
    assert service_env["MLOPS__STORAGE__ROOT"].startswith("s3://")
    assert service_env["MLOPS__STORAGE__ENDPOINT_URL"] == "http://minio:9000"
    assert (
        not {"MLOPS_DEPLOYMENT_STATE", "MLOPS__SERVING__STATE_DIR", "MLOPS_FOLLOW_STATE"} & service_env.keys()
    )
