"""Static checks of docker/k8s/ (no cluster here): the manifests parse and agree with the serving spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "docker" / "k8s"
NAMESPACE = "mlops"
SECRET_EXAMPLE = "secret.example.yaml"
IMAGE = "registry.example.com/product-classifier-service"
STABLE, CANARY = "product-classifier", "product-classifier-canary"
TRACKS = {STABLE: "stable", CANARY: "canary"}
CANARY_ANNOTATION = "nginx.ingress.kubernetes.io/canary"

Manifest = dict[str, Any]


def _manifest_files() -> list[Path]:
    """Every YAML file under docker/k8s/ except the kustomization itself."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of one file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects(include_secret_example: bool = False) -> list[tuple[str, Manifest]]:
    """(file name, object) for every manifest, by default without the Secret template."""
    return [
        (path.name, doc)
        for path in _manifest_files()
        if include_secret_example or path.name != SECRET_EXAMPLE
        for doc in _documents(path)
    ]


def _one(kind: str, name: str) -> Manifest:
    """The single applied object of this kind and name."""
    found = [doc for _, doc in _objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(deployment: Manifest) -> Manifest:
    """The only container of a Deployment's pod template."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port_number(container: Manifest, port: int | str) -> int:
    """A probe or Service port resolved to a container port number (names looked up in `ports`)."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in by_name, f"named port {port!r} is not declared by the container"
    return by_name[port]


def _env(container: Manifest) -> dict[str, Manifest]:
    """A container's env entries by variable name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def _ingress_rule(ingress: Manifest) -> tuple[str, str, str]:
    """(host, path, backend Service name) of an Ingress with a single rule and path."""
    rules = ingress["spec"]["rules"]
    assert len(rules) == 1 and len(rules[0]["http"]["paths"]) == 1
    path = rules[0]["http"]["paths"][0]
    return rules[0]["host"], path["path"], path["backend"]["service"]["name"]


def test_every_document_parses_and_is_a_named_object_in_the_mlops_namespace() -> None:
    objects = _objects(include_secret_example=True)
    assert len(objects) >= 12
    for file_name, doc in objects:
        where = f"{file_name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert doc["metadata"].get("name"), where
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE, where
            assert "namespace" not in doc["metadata"], where
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, where


def test_kustomization_lists_exactly_the_manifest_files_except_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    expected = {p.name for p in _manifest_files()} - {SECRET_EXAMPLE}
    assert set(resources) == expected
    assert (K8S / SECRET_EXAMPLE).is_file()


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_deployment_resources_are_the_spec_values(name: str) -> None:
    resources = _container(_one("Deployment", name))["resources"]
    assert resources == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_probes_hit_livez_and_readyz_on_port_3000(name: str) -> None:
    container = _container(_one("Deployment", name))
    assert _port_number(container, "http") == 3000
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe_name, path in expected.items():
        http_get = container[probe_name]["httpGet"]
        assert http_get["path"] == path, probe_name
        assert _port_number(container, http_get["port"]) == 3000, probe_name


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_pods_are_annotated_for_prometheus_scraping_of_metrics(name: str) -> None:
    annotations = _one("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "3000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_hpa_scales_the_stable_deployment_between_2_and_10_on_cpu_and_memory() -> None:
    hpa = _one("HorizontalPodAutoscaler", STABLE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": STABLE}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    targets = {
        m["resource"]["name"]: m["resource"]["target"] for m in spec["metrics"] if m["type"] == "Resource"
    }
    assert targets == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
    }
    assert _one("Deployment", STABLE)["spec"]["replicas"] == 3
    assert _one("Deployment", CANARY)["spec"]["replicas"] == 1


def test_every_image_is_the_service_image_with_a_pinned_tag() -> None:
    images = [
        container["image"]
        for _, doc in _objects()
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert len(images) == 2
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name == IMAGE, image
        assert tag and "/" not in tag and tag != "latest", f"image is not pinned to a tag: {image}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for override in kustomization.get("images", []):
        assert override.get("newTag", "") != "latest" or override.get("digest"), override


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_each_service_selects_only_the_pods_of_its_own_track(name: str) -> None:
    service = _one("Service", name)
    selector = service["spec"]["selector"]
    assert selector.get("track") == TRACKS[name]
    for deployment_name in TRACKS:
        deployment = _one("Deployment", deployment_name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selects = selector.items() <= pod_labels.items()
        assert selects == (deployment_name == name), f"Service {name} vs Deployment {deployment_name}"
    container = _container(_one("Deployment", name))
    for port in service["spec"]["ports"]:
        assert _port_number(container, port["targetPort"]) == 3000


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_deployment_selectors_match_their_own_pods_only(name: str) -> None:
    spec = _one("Deployment", name)["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["track"] == TRACKS[name]
    assert spec["selector"]["matchLabels"].get("track") == TRACKS[name], "selectors of both tracks overlap"


def test_canary_ingress_sends_ten_percent_to_the_canary_service_on_the_main_host_and_path() -> None:
    main, canary = _one("Ingress", STABLE), _one("Ingress", CANARY)
    main_annotations = main["metadata"].get("annotations", {})
    assert main_annotations.get(CANARY_ANNOTATION, "false") == "false"
    assert canary["metadata"]["annotations"][CANARY_ANNOTATION] == "true"
    assert canary["metadata"]["annotations"][f"{CANARY_ANNOTATION}-weight"] == "10"
    main_host, main_path, main_backend = _ingress_rule(main)
    canary_host, canary_path, canary_backend = _ingress_rule(canary)
    assert (canary_host, canary_path) == (main_host, main_path)
    assert (main_backend, canary_backend) == (STABLE, CANARY)
    assert main["spec"]["ingressClassName"] == canary["spec"]["ingressClassName"] == "nginx"
    for ingress in (main, canary):
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        service_ports = _one("Service", backend["name"])["spec"]["ports"]
        assert any(backend["port"] in ({"name": p["name"]}, {"number": p["port"]}) for p in service_ports)


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_api_keys_come_from_the_secret_and_settings_from_the_configmap(name: str) -> None:
    env = _env(_container(_one("Deployment", name)))
    for variable, key in (("MLOPS_API_KEYS", "api-keys"), ("MLOPS_FEEDBACK_SECRET", "feedback-secret")):
        assert "value" not in env[variable], variable
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("product-classifier-api-keys", key)
    # the pod listens beyond loopback, so the service's fail-closed check applies (keys are required)
    assert env["MLOPS__SERVING__HOST"]["value"] == "0.0.0.0"
    config_ref = env["MLOPS__STORAGE__ROOT"]["valueFrom"]["configMapKeyRef"]
    assert config_ref["name"] == "product-classifier-config"
    assert config_ref["key"] in _one("ConfigMap", "product-classifier-config")["data"]
    assert env["BENTOML_DO_NOT_TRACK"]["value"] == "true" and env["DO_NOT_TRACK"]["value"] == "1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env.keys()


def test_only_the_secret_template_holds_secret_data_and_its_value_is_a_placeholder() -> None:
    for file_name, doc in _objects():
        assert doc["kind"] != "Secret", f"{file_name} contains a Secret"
        assert "stringData" not in doc, file_name
    (example,) = _documents(K8S / SECRET_EXAMPLE)
    assert example["kind"] == "Secret" and example["metadata"]["name"] == "product-classifier-api-keys"
    assert set(example.get("stringData", {})) == {"api-keys", "feedback-secret"} and "data" not in example
    assert set(example["stringData"].values()) == {"REPLACE_ME"}


def test_aws_access_is_granted_through_the_service_account_role() -> None:
    account = _one("ServiceAccount", STABLE)
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for name in TRACKS:
        assert _one("Deployment", name)["spec"]["template"]["spec"]["serviceAccountName"] == STABLE


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_containers_run_as_non_root_on_a_read_only_root_filesystem(name: str) -> None:
    pod = _one("Deployment", name)["spec"]["template"]["spec"]
    container = _container(_one("Deployment", name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    security = container["securityContext"]
    assert security.get("runAsUser", 1) != 0 and security.get("runAsNonRoot", True) is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_writable_paths_are_empty_dirs_and_bentoml_home_is_one_of_them(name: str) -> None:
    pod = _one("Deployment", name)["spec"]["template"]["spec"]
    empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    mounts = {m["mountPath"]: m["name"] for m in _container(_one("Deployment", name))["volumeMounts"]}
    for path in ("/tmp", "/home/bentoml/bentoml"):
        assert mounts.get(path) in empty_dirs, f"{path} is not an emptyDir mount"
    assert _env(pod["containers"][0])["BENTOML_HOME"]["value"] == "/home/bentoml/bentoml"


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_rolling_updates_never_take_a_serving_pod_away_first(name: str) -> None:
    spec = _one("Deployment", name)["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 30


def test_pod_disruption_budget_keeps_one_stable_pod() -> None:
    pdb = _one("PodDisruptionBudget", STABLE)
    assert pdb["spec"]["minAvailable"] == 1
    pod_labels = _one("Deployment", STABLE)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"] == {"app": "product-classifier", "track": "stable"}
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", [STABLE, CANARY])
def test_every_pod_follows_the_deployment_state_in_s3_and_heartbeats_as_itself(name: str) -> None:
    """No local state file: pods read serving/state.json under an s3:// root and name themselves."""
    env = _env(_container(_one("Deployment", name)))
    root = _one("ConfigMap", "product-classifier-config")["data"]["MLOPS__STORAGE__ROOT"]
    assert root.startswith("s3://")
    assert env["MLOPS_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MLOPS_REPLICA_URL"]["value"] == "http://$(POD_IP):3000"
    assert not {"MLOPS_DEPLOYMENT_STATE", "MLOPS__SERVING__STATE_DIR", "MLOPS_FOLLOW_STATE"} & env.keys()
