"""Build, check, deploy and roll back the prediction service.

build:   a registered model version -> a bundle in the BentoML model store -> ``bentoml build``;
         the bento tag is recorded on the MLflow model version.
check:   the bento runs on a scratch port (like TFX's InfraValidator); golden test-split images
         must come back with the offline predictions, within the latency bound, behind auth.
deploy:  the live endpoint is one long-running service that follows a deployment state file
         (stable version, canary version and share, previous version). Writing the file is the
         switch: every worker loads the new model completely before it routes a request to it
         (an in-service swap, so no request fails during a deploy). ``canary`` stages a version
         on a share of traffic; ``full`` makes it the stable model and keeps the old one as
         ``previous`` for rollback.
rollback: back to the previous (or a named) version, champion alias included, with an audit record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ml import registry
from ml.config import REPO_ROOT, Settings
from ml.serving import BundleMeta, DeploymentState, read_state, write_bundle, write_state
from ml.storage import Storage

AUDIT_PREFIX = "serving/audit"
STATE_FILE = "deployment.json"
LIVE_STREAK = 8  # consecutive /version answers that must agree before a deploy counts as live
BENTOFILE = REPO_ROOT / "bentos" / "bentofile.yaml"
SERVICE = "bentos.service:ImageClassifier"


class DeployError(RuntimeError):
    """A deploy step cannot go on; the message says why."""


def use_bentoml_home(settings: Settings) -> Path:
    """Point BentoML at the configured store (``BENTOML_HOME`` wins); call before importing bentoml."""
    home = os.environ.get("BENTOML_HOME") or str((REPO_ROOT / settings.serving.bentoml_home).resolve())
    os.environ["BENTOML_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return Path(home)


def state_path(settings: Settings) -> Path:
    return (REPO_ROOT / settings.serving.state_dir).resolve() / STATE_FILE


def live_url(settings: Settings) -> str:
    host = settings.serving.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{settings.serving.port}"


def model_tag(settings: Settings, version: str, run_id: str) -> str:
    """Version and training run: two registries (or a recreated one) never share a tag."""
    return f"{settings.mlflow.registered_model}:v{version}-{run_id[:12]}"


def import_model(settings: Settings, version: str) -> str:
    """The model version as a bundle in the BentoML model store (idempotent); returns its tag."""
    from ml.drift import REFERENCE_ARTIFACTS
    from ml.preprocessing import Preprocessing

    use_bentoml_home(settings)
    import bentoml
    from mlflow.exceptions import MlflowException

    client = registry.client(settings)
    try:
        model_version = client.get_model_version(settings.mlflow.registered_model, str(version))
    except MlflowException as exc:
        raise DeployError(f"no version {version} of {settings.mlflow.registered_model}: {exc}") from None
    tag = model_tag(settings, version, model_version.run_id)
    try:
        bentoml.models.get(tag)
        return tag
    except bentoml.exceptions.NotFound:
        pass
    run = client.get_run(model_version.run_id)
    prep = Preprocessing.from_settings(settings.preprocessing)
    trained_with = run.data.params.get("preprocessing", prep.version)
    if trained_with != prep.version:
        raise DeployError(
            f"v{version} was trained with preprocessing {trained_with}, the config has {prep.version}"
        )
    with tempfile.TemporaryDirectory() as folder:
        onnx = Path(client.download_artifacts(model_version.run_id, "onnx/model.onnx", folder))
        pca = Path(client.download_artifacts(model_version.run_id, f"{REFERENCE_ARTIFACTS}/pca.npz", folder))
        names = Path(client.download_artifacts(model_version.run_id, "model_meta/class_names.json", folder))
        _require_serving_outputs(onnx, version)
        meta = BundleMeta(
            model_version=str(version),
            dataset_version=model_version.tags.get("dataset_version", ""),
            run_id=model_version.run_id,
            classes=list(json.loads(names.read_text())["classes"]),
            image_size=prep.image_size,
            mean=prep.mean,
            std=prep.std,
        )
        labels = {"registered_model": settings.mlflow.registered_model, "model_version": str(version)}
        with bentoml.models.create(tag, labels=labels, metadata=asdict(meta)) as model:
            write_bundle(Path(model.path), onnx, pca, meta)
    return tag


def _require_serving_outputs(onnx: Path, version: str) -> None:
    import onnx as onnx_lib

    outputs = {out.name for out in onnx_lib.load(str(onnx), load_external_data=False).graph.output}
    if not {"logits", "features"} <= outputs:
        raise DeployError(f"v{version}'s ONNX export has outputs {sorted(outputs)}; retrain it to serve it")


def code_hash() -> str:
    """What a bento's code is: the service, the ml package and params.yaml."""
    digest = hashlib.sha256()
    for path in sorted(
        [*REPO_ROOT.glob("bentos/*.py"), *REPO_ROOT.glob("ml/*.py"), BENTOFILE, REPO_ROOT / "params.yaml"]
    ):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def build_bento(settings: Settings, version: str) -> str:
    """``bentoml build`` of the service with this version packed in; idempotent per version and code."""
    tag_of_model = import_model(settings, version)
    import bentoml

    name = settings.serving.bento_name
    bento_version = f"{tag_of_model.split(':', 1)[1]}-{code_hash()}"  # model version, its run, the code
    tag = f"{name}:{bento_version}"
    try:
        bentoml.get(tag)
    except bentoml.exceptions.NotFound:
        options = yaml.safe_load(BENTOFILE.read_text())
        with tempfile.TemporaryDirectory() as folder:
            ctx = Path(folder)
            shutil.copytree(REPO_ROOT / "ml", ctx / "ml", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copytree(
                REPO_ROOT / "bentos", ctx / "bentos", ignore=shutil.ignore_patterns("__pycache__")
            )
            shutil.copy(REPO_ROOT / "params.yaml", ctx / "params.yaml")
            packed = {"model_version": str(version), "model_tag": tag_of_model, "bento_tag": tag}
            (ctx / "bentos" / "packed.json").write_text(json.dumps(packed, indent=2))
            (ctx / "bentofile.yaml").write_text(yaml.safe_dump(options | {"models": [tag_of_model]}))
            bentoml.bentos.build_bentofile(
                str(ctx / "bentofile.yaml"),
                name=name,
                version=bento_version,
                labels={**options.get("labels", {}), "model_version": str(version)},
                build_ctx=str(ctx),
            )
    registry.client(settings).set_model_version_tag(
        settings.mlflow.registered_model, str(version), "bento_tag", tag
    )
    return tag


# -- the serving check ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    passed: bool
    version: str
    bento_tag: str
    images: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_probability_gap: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bentoml_command() -> str:
    return str(Path(sys.executable).parent / "bentoml")


def http(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """One HTTP request with the standard library; (status, body) whatever the status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(field_name: str, files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one part per file under ``field_name``; (body, content type)."""
    boundary = secrets.token_hex(12)
    parts = []
    for filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None, timeout: float, path: str = "/readyz"
) -> None:
    """Poll ``url + path`` until it answers 200; ``DeployError`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DeployError(f"the service exited with code {process.returncode} before it was ready")
        try:
            if http("GET", f"{url}{path}", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise DeployError(f"{url} was not ready within {timeout:.0f} s")


def start_service(
    target: str, port: int, env: dict[str, str], log_file: Path, host: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    """``bentoml serve TARGET`` (a bento tag or the source service) in its own process group."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [bentoml_command(), "serve", target, "--host", host, "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_service(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def golden_images(settings: Settings, storage: Storage) -> list[tuple[str, bytes]]:
    """A class-balanced handful of test-split images of the current dataset (curated bytes)."""
    from ml.train import dataset_rows

    _, rows = dataset_rows(storage)
    test = rows[rows["split"] == "test"].sort_values("sha256")
    per_class = max(1, settings.serving.check_images // max(1, test["label"].nunique()))
    picked = test.groupby("label", sort=True).head(per_class).head(settings.serving.check_images)
    return [(key, storage.read_bytes(key)) for key in picked["curated_key"]]


def offline_probabilities(bundle: Path, images: list[bytes]) -> np.ndarray:
    """What the model says offline: the training-side preprocessing and the bundle's ONNX."""
    from ml.preprocessing import batch_arrays, decode_rgb
    from ml.retrain import onnx_predict_proba

    prep = BundleMeta.read(bundle).preprocessing
    return onnx_predict_proba(
        bundle / "model.onnx", batch_arrays([decode_rgb(data) for data in images], prep)
    )


def serving_check(settings: Settings, storage: Storage, version: str, bento_tag: str) -> CheckResult:
    """Run the bento on a scratch port and hold it to the offline predictions and the latency bound."""
    use_bentoml_home(settings)
    import bentoml

    result = CheckResult(False, str(version), bento_tag)
    images = golden_images(settings, storage)
    if not images:
        result.reasons.append("no test-split images to check with")
        return result
    bundle = Path(bentoml.models.get(import_model(settings, version)).path)
    expected = offline_probabilities(bundle, [data for _, data in images])
    classes = BundleMeta.read(bundle).classes
    port, key = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MLOPS_DEPLOYMENT_STATE"}
    env |= {"MLOPS_API_KEYS": key, "MLOPS_PREDICTION_LOG": "off", "MLOPS_API_KEYS_FILE": ""}
    log_file = state_path(settings).parent / "logs" / f"check-v{version}.log"
    url = f"http://127.0.0.1:{port}"
    process = start_service(bento_tag, port, env, log_file)
    try:
        wait_ready(url, process, settings.serving.check_timeout_seconds)
        status, body = http("GET", f"{url}/version", headers={"Authorization": f"Bearer {key}"})
        served = json.loads(body).get("model_version") if status == 200 else None
        if served != str(version):
            result.reasons.append(f"/version says model {served!r} (HTTP {status}), expected {version}")
        latencies, gaps = [], []
        for (name, data), want in zip(images, expected, strict=True):
            payload, content_type = multipart("image", [(Path(name).name, data)])
            started = time.perf_counter()
            status, body = http(
                "POST",
                f"{url}/predict",
                body=payload,
                headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"},
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                result.reasons.append(f"{name}: HTTP {status} {body[:200]!r}")
                continue
            answer = json.loads(body)
            got = np.array([answer["probabilities"][c] for c in classes])
            gaps.append(float(np.max(np.abs(got - want))))
            if answer["predicted_class"] != classes[int(np.argmax(want))]:
                result.reasons.append(
                    f"{name}: served {answer['predicted_class']}, offline {classes[int(np.argmax(want))]}"
                )
        payload, content_type = multipart("image", [("x.png", images[0][1])])
        status, _ = http("POST", f"{url}/predict", body=payload, headers={"Content-Type": content_type})
        if status != 401:
            result.reasons.append(f"a request without the API key got HTTP {status}, not 401")
        result.images = len(images)
        result.p50_ms = round(float(np.percentile(latencies, 50)), 2)
        result.p99_ms = round(float(np.percentile(latencies, 99)), 2)
        result.max_probability_gap = round(max(gaps, default=1.0), 6)
        if result.max_probability_gap > settings.acceptance.onnx_max_abs_diff:
            result.reasons.append(
                f"served probabilities differ from offline by {result.max_probability_gap:.2e} "
                f"> {settings.acceptance.onnx_max_abs_diff}"
            )
        if result.p99_ms > settings.serving.check_latency_p99_ms:
            result.reasons.append(
                f"p99 latency {result.p99_ms} ms > {settings.serving.check_latency_p99_ms} ms"
            )
    except (DeployError, OSError, ValueError, KeyError) as exc:
        result.reasons.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_service(process)
    result.passed = not result.reasons
    return result


# -- deploy and rollback ---------------------------------------------------------------------------


def audit(storage: Storage, action: str, record: dict[str, Any]) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    entry = {"action": action, "at": now.isoformat(timespec="seconds"), **record}
    storage.write_bytes(
        f"{AUDIT_PREFIX}/{now.strftime('%Y%m%dT%H%M%S%fZ')}-{action}.json",
        json.dumps(entry, indent=2).encode(),
    )
    return entry


def audit_log(storage: Storage) -> list[dict[str, Any]]:
    return [json.loads(storage.read_bytes(key)) for key in storage.list(AUDIT_PREFIX)]


def deploy(
    settings: Settings, storage: Storage, version: str, *, stage: str, by: str, reason: str = ""
) -> dict[str, Any]:
    """Stage ``version`` as the canary or make it the stable model; wait for a running endpoint to follow."""
    if stage not in ("canary", "full"):
        raise DeployError(f"stage must be canary or full, not {stage!r}")
    tag = import_model(settings, version)
    path = state_path(settings)
    current = read_state(path)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if current is None or (stage == "full" and current.stable == str(version)):
        new = DeploymentState(stable=str(version), previous=current.previous if current else None)
    elif stage == "canary":
        new = replace(current, canary=str(version), canary_share=settings.serving.canary_share)
    else:
        new = DeploymentState(stable=str(version), previous=current.stable)
    models = {
        v: t
        for v, t in (current.models if current else {}).items()
        if v in (new.stable, new.canary, new.previous)
    }
    new = replace(
        new,
        updated_at=now,
        updated_by=by,
        reason=reason or f"{stage} deploy of v{version}",
        models=models | {str(version): tag},
    )
    write_state(path, new)
    entry = audit(
        storage,
        f"deploy-{stage}",
        {
            "by": by,
            "from": current.stable if current else None,
            "to": str(version),
            "why": new.reason,
            "state": asdict(new),
        },
    )
    return {"state": asdict(new), "audit": entry, "live": wait_live(settings, new)}


def withdraw_canary(settings: Settings, storage: Storage, version: str, *, by: str) -> str:
    """Take ``version`` off the canary (a challenger that was not approved); idempotent."""
    path = state_path(settings)
    current = read_state(path)
    if current is None or current.canary != str(version):
        return f"v{version} is not the canary"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    new = replace(
        current, canary=None, canary_share=0.0, updated_at=now, updated_by=by, reason="canary withdrawn"
    )
    write_state(path, new)
    audit(
        storage,
        "withdraw-canary",
        {"by": by, "from": str(version), "to": current.stable, "why": "not approved"},
    )
    wait_live(settings, new)
    return f"v{version} withdrawn from the canary; v{current.stable} serves all traffic"


def wait_live(settings: Settings, state: DeploymentState, timeout: float = 60) -> bool | None:
    """True once a running endpoint serves ``state``; None when none is running; False on timeout.

    Every worker process swaps on its own, so the answer must hold for ``LIVE_STREAK`` /version
    calls in a row (new connections land on any worker), spanning more than one poll interval.
    """
    url = live_url(settings)
    try:
        status, _ = http("GET", f"{url}/livez", timeout=2)
    except OSError:
        return None
    if status != 200:
        return None
    key = first_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wanted = (state.stable, state.canary if state.canary_share > 0 else None)
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{url}/version", headers=headers, timeout=5)
            info = json.loads(body) if status == 200 else {}
        except (OSError, ValueError):
            info = {}
        streak = streak + 1 if (info.get("model_version"), info.get("canary_version")) == wanted else 0
        if streak >= LIVE_STREAK:
            return True
        time.sleep(0.2)
    return False


def first_key() -> str:
    from ml.serving import api_keys

    keys = sorted(api_keys())
    return keys[0] if keys else ""


def rollback(
    settings: Settings, storage: Storage, *, to: str | None = None, by: str, reason: str
) -> dict[str, Any]:
    """Serve the previous (or named) version again, make it the champion, and record who, when and why."""
    path = state_path(settings)
    current = read_state(path)
    if current is None:
        raise DeployError(f"nothing is deployed (no {path}); nothing to roll back")
    target = str(to) if to else current.previous
    if not target:
        raise DeployError(f"v{current.stable} has no previous version recorded; name one with --to")
    if target == current.stable and not current.canary:
        raise DeployError(f"v{target} is already the live model")
    tag = import_model(settings, target)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    models = {current.stable: current.tag(current.stable), target: tag}
    new = DeploymentState(
        models=models,
        stable=target,
        previous=current.stable,
        updated_at=now,
        updated_by=by,
        reason=f"rollback: {reason}",
    )
    write_state(path, new)
    mlflow_client = registry.client(settings)
    name = settings.mlflow.registered_model
    if registry.version_for_alias(settings, registry.CHAMPION) != target:
        registry.promote(settings, storage, target, by, note=f"rollback from v{current.stable}: {reason}")
    for version in {current.stable, current.canary} - {None, target}:
        mlflow_client.set_model_version_tag(name, str(version), "rolled_back", f"{now} by {by}: {reason}")
    entry = audit(
        storage,
        "rollback",
        {"by": by, "from": current.stable, "canary_dropped": current.canary, "to": target, "why": reason},
    )
    return {"state": asdict(new), "audit": entry, "live": wait_live(settings, new)}


def ensure_state(settings: Settings, storage: Storage) -> DeploymentState:
    """The deployment state, created from the champion when nothing was deployed yet."""
    current = read_state(state_path(settings))
    if current is not None:
        return current
    champion = registry.version_for_alias(settings, registry.CHAMPION)
    if champion is None:
        raise DeployError("no champion model yet: train and promote one first (retrain DAG or `mlops train`)")
    deploy(settings, storage, champion, stage="full", by="mlops serve", reason="first deploy of the champion")
    state = read_state(state_path(settings))
    assert state is not None
    return state


def serve_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["MLOPS_DEPLOYMENT_STATE"] = str(state_path(settings))
    env["BENTOML_HOME"] = str(use_bentoml_home(settings))
    return env


def serve_host(settings: Settings) -> str:
    """The configured host, or 127.0.0.1 when no API key is configured (never an open endpoint)."""
    from ml.serving import api_keys

    if not api_keys(keys_file=settings.serving.api_keys_file) and settings.serving.host not in (
        "127.0.0.1",
        "localhost",
    ):
        print(
            "WARNING: no API key configured (MLOPS_API_KEYS); "
            f"binding to 127.0.0.1, not {settings.serving.host}",
            file=sys.stderr,
        )
        return "127.0.0.1"
    return settings.serving.host


def release(
    settings: Settings,
    storage: Storage,
    version: str,
    *,
    stage: str,
    by: str,
    check: bool = True,
    reason: str = "",
) -> dict[str, Any]:
    """Build the bento, run the serving check (unless skipped), deploy. A failed check deploys nothing."""
    bento_tag = build_bento(settings, version)
    result: dict[str, Any] = {"model_version": str(version), "bento_tag": bento_tag}
    if check:
        outcome = serving_check(settings, storage, version, bento_tag)
        result["check"] = outcome.to_dict()
        if not outcome.passed:
            raise DeployError(
                f"serving check of v{version} ({bento_tag}) failed: {'; '.join(outcome.reasons)}"
            )
    return result | deploy(settings, storage, version, stage=stage, by=by, reason=reason)
