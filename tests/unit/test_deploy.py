"""Release helpers that need no model: binding, tags, multipart bodies, state transitions on disk."""

from __future__ import annotations

import pytest

from ml.config import load_settings
from ml.http import multipart
from ml.release import build, deploy, service
from ml.release.errors import DeployError
from ml.serving.state import DeploymentState


def test_without_an_api_key_the_service_binds_to_localhost_only(monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLOPS_API_KEYS", raising=False)
    monkeypatch.delenv("MLOPS_API_KEYS_FILE", raising=False)
    settings = load_settings(environ={"MLOPS__SERVING__HOST": "0.0.0.0"})
    assert service.serve_host(settings) == "127.0.0.1"
    assert "no API key configured" in capsys.readouterr().err
    monkeypatch.setenv("MLOPS_API_KEYS", "k1")
    assert service.serve_host(settings) == "0.0.0.0"


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
    write_state(service.state_path(settings), DeploymentState(stable="3"))
    with pytest.raises(DeployError, match="no previous version"):
        deploy.rollback(settings, storage, by="me", reason="x")
    assert deploy.withdraw_canary(settings, storage, "4", by="me") == "v4 is not the canary"
