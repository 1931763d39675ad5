"""The ``mlops`` command line: one subcommand per pipeline step, the same functions the DAGs call."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ml.config import REPO_ROOT, ConfigError, Settings, load_settings

EXIT_OK, EXIT_USAGE, EXIT_REJECTED, EXIT_NOTHING, EXIT_UNAVAILABLE = 0, 2, 3, 4, 5
Handler = Callable[[Settings, argparse.Namespace], dict[str, Any]]
DEMO_START = dt.date(2026, 1, 5)


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """What ``ingest_daily`` does for a day: once upstream's labels.csv is there, land the labelled
    served images beside it (unless ``--no-feedback``), then ingest."""
    from ml.data.feedback import land_feedback
    from ml.data.ingest import ingest_day
    from ml.layout import DayLayout
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    feedback = None
    if args.feedback and storage.exists(DayLayout(args.date).labels):
        feedback = land_feedback(storage, args.date, settings.ingest.feedback_lookback_days).to_dict()
    return ingest_day(settings, storage, args.date).to_dict() | {"feedback": feedback}


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.demo.drawing import Drift
    from ml.demo.landing import land_days
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    drift = Drift.parse(args.drift) if args.drift else None
    days = land_days(
        storage,
        args.start,
        args.days,
        settings.classes,
        count=args.per_day,
        seed=args.seed,
        drift=drift,
        drift_from=args.drift_from,
    )
    return {"storage": storage.root_url, "days": days}


def cmd_train(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.runs import RunContext
    from ml.storage import storage_from_settings
    from ml.training.pipeline import retrain

    overrides = {"epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size}
    return retrain(
        settings,
        storage_from_settings(settings),
        overrides=overrides,
        context=RunContext(trigger="manual", note=args.note or ""),
        dataset_day=args.dataset_day,
        dataset_version=args.dataset_version,
        force=args.force,
        shuffle_labels=args.shuffle_labels,
    ).to_dict()


def cmd_tune(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.runs import RunContext
    from ml.storage import storage_from_settings
    from ml.training.tune import tune_and_train

    return tune_and_train(
        settings,
        storage_from_settings(settings),
        trials=args.trials,
        timeout=args.timeout,
        dataset_version=args.dataset_version,
        worker=args.worker,
        search_only=args.search_only,
        parallel=1 if args.search_only else (args.parallel or settings.tuning.parallel),
        context=RunContext(trigger="manual", reason="tuned", note=args.note or ""),
    ).to_dict()


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.storage import storage_from_settings
    from ml.training.pipeline import evaluate_version

    return evaluate_version(settings, storage_from_settings(settings), args.model_version)


def cmd_validate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.storage import storage_from_settings
    from ml.training.revalidate import validate_version

    return validate_version(settings, storage_from_settings(settings), args.version)


def cmd_promote(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    import getpass
    from dataclasses import asdict

    from ml import registry
    from ml.storage import storage_from_settings

    version = args.version or registry.version_for_alias(settings, registry.CHALLENGER)
    if version is None:
        raise ValueError("no model version given and no challenger registered")
    approver = args.approved_by or getpass.getuser()
    return asdict(
        registry.promote(settings, storage_from_settings(settings), version, approver, args.note or "")
    )


def cmd_drift(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.monitoring.drift import measure_day
    from ml.storage import storage_from_settings

    return measure_day(settings, storage_from_settings(settings), args.date).summary()


def cmd_monitor(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.alerts import env_notify
    from ml.release.guard import check_live
    from ml.storage import storage_from_settings

    return check_live(
        settings,
        storage_from_settings(settings),
        notify=None if args.no_alerts else env_notify(settings),
        origin="mlops monitor",
        allow_rollback=False if args.no_rollback else None,
        by=f"mlops monitor ({_who(None)})",
    )


def _who(name: str | None) -> str:
    import getpass

    return name or getpass.getuser()


def cmd_deploy(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml import registry
    from ml.release.deploy import release
    from ml.storage import storage_from_settings

    version = args.version or registry.version_for_alias(settings, registry.CHAMPION)
    if version is None:
        raise ValueError("no model version given and no champion registered")
    return release(
        settings,
        storage_from_settings(settings),
        str(version),
        stage=args.stage,
        by=_who(args.by),
        check=not args.skip_check,
        reason=args.reason or "",
    )


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.release.deploy import rollback
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    return rollback(settings, storage, to=args.to, by=_who(args.by), reason=args.reason).to_dict()


def cmd_ab(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The canary against the stable model on the last ``--hours`` of live traffic."""
    from ml.monitoring.ab import measure_ab
    from ml.serving.state import read_state
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    state = read_state(storage)
    control = args.control or (state.stable if state else None)
    challenger = args.challenger or (state.canary if state else None)
    if not challenger:
        raise ValueError("no challenger: nothing is deployed as canary; name one with --challenger VERSION")
    if not control:
        raise ValueError("no control: nothing is deployed as stable; name one with --control VERSION")
    hours = settings.ab.window_hours if args.hours is None else args.hours
    if hours <= 0:
        raise ValueError(f"--hours must be positive (got {hours:g})")
    end = dt.datetime.now(dt.UTC)
    start = end - dt.timedelta(hours=hours)
    return measure_ab(settings, storage, control, challenger, start, end).to_dict()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Replace this process with ``bentoml serve`` of the live service (Ctrl-C stops it).

    ``--reload``: restart the running service's workers gracefully instead (its socket stays open).
    """
    import os

    from ml.release.build import SERVICE
    from ml.release.deploy import ensure_state
    from ml.release.service import (
        REPLICA_ENV,
        pid_path,
        reload_service,
        serve_command,
        serve_env,
        serve_host,
        tls_args,
    )
    from ml.storage import storage_from_settings

    port = args.port or settings.serving.port
    if args.reload:
        return reload_service(settings, port)
    host = serve_host(settings)  # before anything else: no open endpoint, no short key
    tls = tls_args(settings)
    storage = storage_from_settings(settings)
    state = ensure_state(settings, storage)
    env = serve_env(settings, port)
    scheme = "https" if tls else "http"
    reached = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - compared, not bound
    env["MLOPS_REPLICA_URL"] = f"{scheme}://{reached}:{port}"
    print(
        f"serving v{state.stable} on {scheme}://{host}:{port} as replica {env[REPLICA_ENV]} "
        f"(state {storage.url('serving/state.json')})",
        flush=True,
    )
    pid_path(settings, port).write_text(f"{os.getpid()}\n")  # exec keeps the pid: it becomes the arbiter's
    os.chdir(REPO_ROOT)
    command = serve_command(SERVICE, host, port, tls)
    os.execve(command[0], command, env)  # noqa: S606 - becomes bentoml serve; argv built here, no shell
    return {}  # not reached


def cmd_shadow(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """How the shadow model's answers compare with the stable model's on the last hours of traffic."""
    from ml.monitoring.shadow import measure_shadow
    from ml.serving.state import read_state
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    state = read_state(storage)
    shadow = args.shadow or (state.shadow if state else None)
    if state is None or not shadow:
        raise ValueError("no shadow deployed (mlops deploy VERSION --stage shadow, or serving.shadow)")
    end = dt.datetime.now(dt.UTC)
    return measure_shadow(storage, state.stable, shadow, end - dt.timedelta(hours=args.hours), end).to_dict()


def cmd_status(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The deployment state, the champion, and every replica with what it serves."""
    from ml.release.deploy import status
    from ml.storage import storage_from_settings

    return status(settings, storage_from_settings(settings))


class PartlyFailed(Exception):
    """A command that did only part of its work: its result is printed and the exit status is non-zero."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"{result.get('failed')} item(s) failed")
        self.result = result


def cmd_predict(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Classify image files with the champion here, or with the live service at ``--url``."""
    import os
    from pathlib import Path

    from ml.serving.local import API_KEY_ENV, predict_local, predict_remote

    files = [Path(name) for name in args.files]
    if args.url:
        key = args.key or os.environ.get(API_KEY_ENV)
        result = predict_remote(args.url, files, key, settings.serving.tls_ca)
    else:
        result = predict_local(settings, files, args.version)
    if result.failed:
        raise PartlyFailed(result.to_dict())
    return result.to_dict()


def cmd_lineage(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Trace a request id, a model version (vN) or an image sha256 through serving, registry and catalog."""
    from ml.ops.lineage import lineage
    from ml.storage import storage_from_settings

    traced = lineage(settings, storage_from_settings(settings), args.id, day=args.day)
    return traced.to_dict() if args.json else traced.summary()


def cmd_forget(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Erase one image from curated storage, landing, the catalog and the feature cache."""
    from ml.ops.erasure import forget
    from ml.storage import storage_from_settings

    storage = storage_from_settings(settings)
    return forget(settings, storage, args.sha256, reason=args.reason, by=_who(args.by)).to_dict()


def cmd_config(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def _data_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    ingest = add("ingest", cmd_ingest, "validate and curate one landing day")
    ingest.add_argument("--date", type=_date, required=True, help="landing day YYYY-MM-DD")
    ingest.add_argument(
        "--no-feedback",
        dest="feedback",
        action="store_false",
        help="do not land the labelled served images (serving.log_images) into the day first",
    )

    demo = add("demo-data", cmd_demo_data, "land generated demo days")
    demo.add_argument("--days", type=int, default=3)
    demo.add_argument("--start", type=_date, default=DEMO_START, help=f"first day (default {DEMO_START})")
    demo.add_argument("--per-day", type=int, default=200, help="images per day")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--drift", help="KIND:STRENGTH, KIND in brightness, blur, class_mix; strength 0..1")
    demo.add_argument("--drift-from", type=int, default=None, help="0-based day index where drift starts")

    drift = add("drift", cmd_drift, "drift of one curated day against the champion (Evidently report)")
    drift.add_argument("--date", type=_date, required=True, help="curated day YYYY-MM-DD")


def _training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    train = add("train", cmd_train, "train, evaluate, gate and register a challenger")
    train.add_argument("--epochs", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--batch-size", type=int)
    dataset = train.add_mutually_exclusive_group()
    dataset.add_argument(
        "--dataset-day", type=_date, help="train on this day's dataset version (default: LATEST)"
    )
    dataset.add_argument(
        "--dataset-version", help="train on this dataset version id (catalog/versions/by_id/ID.json)"
    )
    train.add_argument(
        "--force", action="store_true", help="train even if the champion saw this dataset version"
    )
    train.add_argument("--note", help="free text recorded with the MLflow run")
    train.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="negative control: train on shuffled labels (the gate must reject)",
    )

    evaluate = add("evaluate", cmd_evaluate, "evaluate a registered model version on the test split")
    evaluate.add_argument("--model-version", required=True)

    validate = add("validate", cmd_validate, "validate a registered version on the current dataset")
    validate.add_argument("version", nargs="?", help="model version (default: challenger, else champion)")

    promote = add("promote", cmd_promote, "approve a version as champion (default: challenger)")
    promote.add_argument("version", nargs="?")
    promote.add_argument("--approved-by", help="who approves (default: the current user)")
    promote.add_argument("--note")

    tune = add("tune", cmd_tune, "search hyperparameters (Optuna), cross-validate the best, train, gate")
    tune.add_argument("--trials", type=int, help="the study's trial budget (default: tuning.trials)")
    tune.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    tune.add_argument("--dataset-version", help="tune on this dataset version id (default: LATEST)")
    tune.add_argument("--worker", type=int, default=0, help="this worker's slot (seeds its sampler)")
    tune.add_argument(
        "--search-only", action="store_true", help="only run trials (a parallel worker): no CV or final model"
    )
    tune.add_argument(
        "--parallel", type=int, help="local worker processes sharing the study (default: tuning.parallel)"
    )
    tune.add_argument("--note", help="free text recorded with the final MLflow run")


def _serving_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    deploy = add("deploy", cmd_deploy, "build the bento, run the serving check, deploy (default: champion)")
    deploy.add_argument("version", nargs="?")
    deploy.add_argument("--stage", choices=["canary", "full", "shadow"], default="full")
    deploy.add_argument("--skip-check", action="store_true", help="deploy without the serving check")
    deploy.add_argument("--by", help="who deploys (default: the current user)")
    deploy.add_argument("--reason")

    rollback = add("rollback", cmd_rollback, "serve the previous (or a named) version again")
    rollback.add_argument("--to", help="model version to return to (default: the previous one)")
    rollback.add_argument("--reason", required=True, help="why (recorded in the audit)")
    rollback.add_argument("--by", help="who rolls back (default: the current user)")

    monitor = add("monitor", cmd_monitor, "check the live endpoint: latency, errors, live accuracy, drift")
    monitor.add_argument("--no-alerts", action="store_true", help="judge and record, send nothing")
    monitor.add_argument("--no-rollback", action="store_true", help="never roll back automatically")

    ab = add("ab", cmd_ab, "A/B: the canary against the stable model (accuracy, latency, errors)")
    ab.add_argument("--control", help="model version of the control arm (default: the deployed stable)")
    ab.add_argument("--challenger", help="model version of the challenger arm (default: the deployed canary)")
    ab.add_argument("--hours", type=float, help="window: the last this many hours (default: ab.window_hours)")

    add("status", cmd_status, "what is deployed and what every replica serves")

    predict = add(
        "predict", cmd_predict, "classify image files: the champion here, or the live service (--url)"
    )
    predict.add_argument("files", nargs="+", metavar="FILE", help="image files")
    predict.add_argument("--url", help="the live service (POST URL/predict) instead of the champion here")
    predict.add_argument("--key", help="API key for --url (default: $MLOPS_API_KEY)")
    predict.add_argument("--version", help="without --url: this registered version (default: the champion)")

    shadow = add("shadow", cmd_shadow, "the shadow model against the stable one on live traffic")
    shadow.add_argument("--shadow", help="shadow version (default: the deployed shadow)")
    shadow.add_argument("--hours", type=float, default=24, help="window (default 24 h)")

    serve = add("serve", cmd_serve, "run the live prediction service (BentoML)")
    serve.add_argument("--port", type=int, help="default: serving.port")
    serve.add_argument(
        "--reload", action="store_true", help="restart the running service's workers gracefully (no downtime)"
    )


def _governance_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    lineage = add("lineage", cmd_lineage, "trace a request id, a model version (vN) or an image sha256")
    lineage.add_argument("id", help="request id, vN, or sha256 (curated or as landed)")
    lineage.add_argument("--day", type=_date, help="a request's day (default: search the whole log)")

    forget = add("forget", cmd_forget, "erase one image (GDPR): curated, landed, catalog, feature cache")
    forget.add_argument("sha256", help="the image's sha256 (curated or as landed)")
    forget.add_argument("--reason", required=True, help="why (recorded in catalog/erasures.jsonl)")
    forget.add_argument("--by", help="who erases (default: the current user)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="overlay config file (default: $MLOPS_CONFIG)")
    common.add_argument("--json", action="store_true", help="print one JSON result on stdout")
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text)
        command.set_defaults(handler=handler)
        return command

    _data_commands(add)
    _training_commands(add)
    _serving_commands(add)
    _governance_commands(add)
    add("config", cmd_config, "print the effective config")
    return parser


def _emit(payload: dict[str, Any], as_json: bool, stream: Any = None) -> None:
    stream = stream or sys.stdout
    if as_json:
        print(json.dumps(payload, sort_keys=True, default=str), file=stream)
    else:
        for key, value in payload.items():
            print(
                f"{key}: {json.dumps(value, default=str) if isinstance(value, dict | list) else value}",
                file=stream,
            )


def main(argv: Sequence[str] | None = None) -> int:
    from ml.data.ingest import BatchRejected, NothingLanded
    from ml.ops.lineage import UnknownId
    from ml.registry import RegistryError
    from ml.release.errors import DeployError

    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = load_settings(args.config)
        _emit(handler(settings, args), args.json)
        return EXIT_OK
    except ConfigError as exc:
        _emit({"error": str(exc), "type": "config"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    except BatchRejected as exc:
        _emit({"error": str(exc), "type": "batch_rejected", "result": exc.result.to_dict()}, args.json)
        return EXIT_REJECTED
    except NothingLanded as exc:
        _emit(
            {"error": str(exc), "type": "nothing_landed"}, args.json, sys.stdout if args.json else sys.stderr
        )
        return EXIT_NOTHING
    except PartlyFailed as exc:
        _emit(exc.result, args.json)
        return EXIT_REJECTED
    except DeployError as exc:
        _emit({"error": str(exc), "type": "deploy"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_REJECTED
    except UnknownId as exc:
        _emit({"error": str(exc), "type": "not_found"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_NOTHING
    except RegistryError as exc:
        _emit({"error": str(exc), "type": "registry"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as exc:
        _emit(
            {"error": str(exc), "type": "invalid_argument"},
            args.json,
            sys.stdout if args.json else sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
