"""Release helpers that need no model: binding, tags, multipart bodies, state transitions on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ml.config import load_settings
from ml.http import multipart
from ml.release import build, deploy, service
from ml.release.errors import DeployError
from ml.serving.state import DeploymentState


def test_without_an_api_key_the_service_refuses_to_serve_beyond_localhost(monkeypatch) -> None:
    from ml.serving.auth import KeyConfigError

    monkeypatch.delenv("MLOPS_API_KEYS", raising=False)
    monkeypatch.delenv("MLOPS_API_KEYS_FILE", raising=False)
    settings = load_settings(environ={"MLOPS__SERVING__HOST": "0.0.0.0"})
    with pytest.raises(KeyConfigError, match="no API key configured .* serving.host is 0.0.0.0: refusing"):
        service.serve_host(settings)
    assert service.serve_host(load_settings(environ={})) == "127.0.0.1"  # loopback needs no key
    monkeypatch.setenv("MLOPS_API_KEYS", "k1")
    with pytest.raises(KeyConfigError, match="2 characters long; keys need at least 32"):
        service.serve_host(settings)
    monkeypatch.setenv("MLOPS_API_KEYS", "k" * 32 + ":predict")
    assert service.serve_host(settings) == "0.0.0.0"


def test_tls_turns_on_https_for_the_service_and_its_local_clients(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    settings = load_settings(
        environ={
            "MLOPS__SERVING__TLS_CERT": str(cert),
            "MLOPS__SERVING__TLS_KEY": str(key),
            "MLOPS__SERVING__PORT": "3443",
        }
    )
    assert settings.serving.live_url == "https://127.0.0.1:3443"
    assert load_settings(environ={}).serving.live_url == "http://127.0.0.1:3000"
    with pytest.raises(DeployError, match="TLS file.* not found"):
        service.tls_args(settings)
    cert.write_text("-----BEGIN CERTIFICATE-----\n"), key.write_text("-----BEGIN PRIVATE KEY-----\n")
    assert service.tls_args(settings) == ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    assert service.tls_ca_file(settings) == str(cert)  # a self-signed certificate is its own CA
    assert service.serve_command("svc", "127.0.0.1", 3443, service.tls_args(settings))[-4:] == [
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
    ]
    from ml.config import ConfigError

    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(environ={"MLOPS__SERVING__TLS_CERT": str(cert)})


def test_model_tags_carry_version_and_run() -> None:
    settings = load_settings(environ={})
    assert build.model_tag(settings, "7", "0123456789abcdef") == "product-classifier:v7-0123456789ab"


def _code_hash_in(root: Path) -> str:
    """``code_hash()`` computed by another interpreter, in a copy of the code at ``root``."""
    found = subprocess.run(
        [sys.executable, "-c", "from ml.release.build import code_hash; print(code_hash())"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "7"},
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


def test_the_code_hash_is_the_packed_files_only_in_any_place_and_process(tmp_path: Path) -> None:
    here = build.code_hash()
    assert len(here) == 10
    root = tmp_path / "copy"
    for name in ("ml", "bentos"):
        shutil.copytree(build.REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(build.REPO_ROOT / "params.yaml", root / "params.yaml")
    assert _code_hash_in(root) == here
    (root / "ml" / "training" / "train.py").write_text("# training changed: no bento changes\n")
    assert _code_hash_in(root) == here
    page = root / "ml" / "serving" / "page.py"
    page.write_text(page.read_text() + "\n# the service changed\n")
    assert _code_hash_in(root) != here


IMPORTED_BY_SERVICE = """
import json, grimp
graph = grimp.build_graph("bentos", "ml", cache_dir=None)
print(json.dumps(sorted(graph.find_upstream_modules("bentos.service") | {"bentos.service"})))
"""


def test_every_module_the_service_imports_is_packed_in_the_bento() -> None:
    # in a fresh interpreter on the repository: a test process may hold another ``bentos`` (a bento's own)
    found = subprocess.run(
        [sys.executable, "-c", IMPORTED_BY_SERVICE],
        cwd=build.REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(build.REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    imported = set(json.loads(found.stdout.strip().splitlines()[-1]))  # at any depth
    assert {"ml.serving.predictor", "ml.training.preprocessing", "ml.storage"} <= imported
    packed = {path.relative_to(build.REPO_ROOT).as_posix() for path in build.serving_files()}
    missing = []
    for module in sorted(imported):
        parts = module.split(".")
        needs = [
            "/".join(parts[:depth]) + "/__init__.py" for depth in range(1, len(parts))
        ]  # every package on the way
        path = "/".join(parts)
        if not {f"{path}.py", f"{path}/__init__.py"} & packed:
            missing.append(module)
        missing.extend(module + ": " + need for need in needs if need not in packed)
    assert not missing, f"the service imports code the bento does not pack (SERVING_CODE): {missing}"


def test_multipart_bodies_carry_each_file_under_the_field() -> None:
    from python_multipart.multipart import parse_options_header

    body, content_type = multipart("images", [("a.png", b"AAA"), ("b.png", b"\x00\xff")])
    kind, options = parse_options_header(content_type)
    assert kind == b"multipart/form-data" and body.count(b'name="images"') == 2
    assert body.endswith(b"--" + options[b"boundary"] + b"--\r\n") and b"\r\n\x00\xff\r\n" in body


def test_rollback_needs_something_deployed_and_a_previous_version(tmp_path) -> None:
    from ml.serving.state import write_state
    from ml.storage import LocalStorage

    settings = load_settings(environ={"MLOPS__SERVING__STATE_DIR": str(tmp_path / "serving")})
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(DeployError, match="nothing is deployed"):
        deploy.rollback(settings, storage, by="me", reason="x")
    write_state(storage, DeploymentState(stable="3"))
    with pytest.raises(DeployError, match="no previous version"):
        deploy.rollback(settings, storage, by="me", reason="x")
    assert deploy.withdraw_canary(settings, storage, "4", by="me") == "v4 is not the canary"


def test_the_stable_model_cannot_be_its_own_canary() -> None:
    current = DeploymentState(stable="3", previous="2")
    with pytest.raises(DeployError, match="v3 is the stable model already"):
        deploy._next_state(current, "3", "canary", 0.1)
    staged = deploy._next_state(current, "4", "canary", 0.1)
    assert (staged.stable, staged.canary, staged.canary_share) == ("3", "4", 0.1)
