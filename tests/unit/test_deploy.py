"""Release helpers that need no model: binding, tags, multipart bodies, state transitions on disk."""

from __future__ import annotations

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


def test_model_tags_carry_version_and_run_and_code_hash_is_stable() -> None:
    settings = load_settings(environ={})
    assert build.model_tag(settings, "7", "0123456789abcdef") == "product-classifier:v7-0123456789ab"
    assert build.code_hash() == build.code_hash() and len(build.code_hash()) == 10


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
