"""Build: a registered model version -> a bundle in the BentoML model store -> ``bentoml build``.

The bento packs only what serving runs (``SERVING_CODE``), so a change to training, the demo or
the DAGs does not give every bento a new code hash. The bento tag is recorded on the MLflow
model version (``bento_tag``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from ml import registry
from ml.config import REPO_ROOT, Settings
from ml.release.errors import DeployError
from ml.serving.bundle import BUNDLE_ONNX, BUNDLE_PCA, publish_bundle, write_bundle
from ml.serving.local import BundleError, write_version_bundle
from ml.storage import Storage
from ml.training.preprocessing import Preprocessing

BENTOFILE = REPO_ROOT / "bentos" / "bentofile.yaml"
SERVICE = "bentos.service:ImageClassifier"
SERVING_CODE = (  # what a bento carries: the service and the parts of ml it imports
    "bentos/*.py",
    "ml/__init__.py",
    "ml/config.py",
    "ml/storage.py",
    "ml/layout.py",
    "ml/data/__init__.py",
    "ml/data/images.py",
    "ml/training/__init__.py",
    "ml/training/preprocessing.py",
    "ml/serving/*.py",
    "ml/serving/*.html",
    "params.yaml",
)


def use_bentoml_home(settings: Settings) -> Path:
    """Point BentoML at the configured store (``BENTOML_HOME`` wins); call before importing bentoml."""
    home = os.environ.get("BENTOML_HOME") or str((REPO_ROOT / settings.serving.bentoml_home).resolve())
    os.environ["BENTOML_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return Path(home)


def model_tag(settings: Settings, version: str, run_id: str) -> str:
    """Version and training run: two registries (or a recreated one) never share a tag."""
    return f"{settings.mlflow.registered_model}:v{version}-{run_id[:12]}"


def import_model(settings: Settings, version: str, storage: Storage | None = None) -> str:
    """The model version as a bundle in the BentoML model store and, given ``storage``, published
    there for replicas on other hosts (idempotent); returns its tag."""
    tag = _import_to_store(settings, version)
    if storage is not None:
        import bentoml

        publish_bundle(storage, tag, Path(bentoml.models.get(tag).path))
    return tag


def _import_to_store(settings: Settings, version: str) -> str:
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
    prep = Preprocessing.from_settings(settings.preprocessing)
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        try:
            meta = write_version_bundle(client, model_version, prep, bundle)
        except BundleError as exc:
            raise DeployError(str(exc)) from None
        labels = {"registered_model": settings.mlflow.registered_model, "model_version": str(version)}
        # BentoML refuses None in metadata: an uncalibrated bundle leaves those keys out
        metadata = {key: value for key, value in asdict(meta).items() if value is not None}
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
            write_bundle(Path(model.path), bundle / BUNDLE_ONNX, bundle / BUNDLE_PCA, meta)
    return tag


def serving_files() -> list[Path]:
    """The files ``SERVING_CODE`` names, sorted."""
    return sorted({path for pattern in SERVING_CODE for path in REPO_ROOT.glob(pattern) if path.is_file()})


def code_hash() -> str:
    """What a bento's code is: the files it packs and its bentofile."""
    digest = hashlib.sha256()
    for path in [*serving_files(), BENTOFILE]:
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def _build_context(folder: Path, version: str, model: str, tag: str, options: dict) -> Path:
    """A build context holding the serving code, ``packed.json`` and the bentofile for one model."""
    for path in serving_files():
        target = folder / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    packed = {"model_version": str(version), "model_tag": model, "bento_tag": tag}
    (folder / "bentos" / "packed.json").write_text(json.dumps(packed, indent=2))
    bentofile = folder / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(options | {"models": [model]}))
    return bentofile


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
            bentofile = _build_context(Path(folder), version, tag_of_model, tag, options)
            bentoml.bentos.build_bentofile(
                str(bentofile),
                name=name,
                version=bento_version,
                labels={**options.get("labels", {}), "model_version": str(version)},
                build_ctx=folder,
            )
    registry.client(settings).set_model_version_tag(
        settings.mlflow.registered_model, str(version), "bento_tag", tag
    )
    return tag
