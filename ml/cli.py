"""The ``mlops`` command line: one subcommand per pipeline step, the same functions the DAGs call."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ml.config import REPO_ROOT, ConfigError, Settings, load_settings

EXIT_OK, EXIT_USAGE, EXIT_REJECTED, EXIT_NOTHING = 0, 2, 3, 4
DEMO_START = dt.date(2026, 1, 5)


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.ingest import ingest_day
    from ml.storage import storage_from_settings

    return ingest_day(settings, storage_from_settings(settings), args.date)


def cmd_demo_data(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.demo_data import Drift, land_days
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
    from ml.retrain import RunContext, train_and_register
    from ml.storage import storage_from_settings

    overrides = {"epochs": args.epochs, "learning_rate": args.learning_rate, "batch_size": args.batch_size}
    return train_and_register(
        settings,
        storage_from_settings(settings),
        overrides=overrides,
        context=RunContext(trigger="manual", note=args.note or ""),
        dataset_day=args.dataset_day,
        force=args.force,
        shuffle_labels=args.shuffle_labels,
    )


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.retrain import evaluate_version
    from ml.storage import storage_from_settings

    return evaluate_version(settings, storage_from_settings(settings), args.model_version)


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
    from ml.drift import monitor_day
    from ml.storage import storage_from_settings

    return monitor_day(settings, storage_from_settings(settings), args.date)


def cmd_monitor(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml.monitor import check
    from ml.storage import storage_from_settings

    notify = None
    if not args.no_alerts:
        from mlops_airflow.alerts import notice_alert, send_alert

        def notify(notice: Any) -> dict[str, str]:
            return send_alert(notice_alert(notice, dag_id="mlops monitor"), settings)

    return check(
        settings,
        storage_from_settings(settings),
        notify=notify,
        rollback=False if args.no_rollback else None,
        by=f"mlops monitor ({_who(None)})",
    )


def _who(name: str | None) -> str:
    import getpass

    return name or getpass.getuser()


def cmd_deploy(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ml import registry
    from ml.deploy import release
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
    from ml.deploy import rollback
    from ml.storage import storage_from_settings

    return rollback(
        settings, storage_from_settings(settings), to=args.to, by=_who(args.by), reason=args.reason
    )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Replace this process with ``bentoml serve`` of the live service (Ctrl-C stops it)."""
    import os

    from ml.deploy import SERVICE, bentoml_command, ensure_state, serve_env, serve_host
    from ml.storage import storage_from_settings

    state = ensure_state(settings, storage_from_settings(settings))
    env = serve_env(settings)
    port = str(args.port or settings.serving.port)
    host = serve_host(settings)
    print(
        f"serving v{state.stable} on http://{host}:{port} (state {env['MLOPS_DEPLOYMENT_STATE']})", flush=True
    )
    os.chdir(REPO_ROOT)
    os.execve(bentoml_command(), [bentoml_command(), "serve", SERVICE, "--host", host, "--port", port], env)
    return {}  # not reached


def cmd_config(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="overlay config file (default: $MLOPS_CONFIG)")
    common.add_argument("--json", action="store_true", help="print one JSON result on stdout")
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", parents=[common], help="validate and curate one landing day")
    ingest.add_argument("--date", type=_date, required=True, help="landing day YYYY-MM-DD")
    ingest.set_defaults(handler=cmd_ingest)

    demo = sub.add_parser("demo-data", parents=[common], help="land generated demo days")
    demo.add_argument("--days", type=int, default=3)
    demo.add_argument("--start", type=_date, default=DEMO_START, help=f"first day (default {DEMO_START})")
    demo.add_argument("--per-day", type=int, default=200, help="images per day")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--drift", help="KIND:STRENGTH, KIND in brightness, blur, class_mix; strength 0..1")
    demo.add_argument("--drift-from", type=int, default=None, help="0-based day index where drift starts")
    demo.set_defaults(handler=cmd_demo_data)

    train = sub.add_parser("train", parents=[common], help="train, evaluate, gate and register a challenger")
    train.add_argument("--epochs", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument(
        "--dataset-day", type=_date, help="train on this day's dataset version (default: LATEST)"
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
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", parents=[common], help="evaluate a registered model version on the test split"
    )
    evaluate.add_argument("--model-version", required=True)
    evaluate.set_defaults(handler=cmd_evaluate)

    promote = sub.add_parser(
        "promote", parents=[common], help="approve a version as champion (default: challenger)"
    )
    promote.add_argument("version", nargs="?")
    promote.add_argument("--approved-by", help="who approves (default: the current user)")
    promote.add_argument("--note")
    promote.set_defaults(handler=cmd_promote)

    drift = sub.add_parser(
        "drift", parents=[common], help="drift of one curated day against the champion (Evidently report)"
    )
    drift.add_argument("--date", type=_date, required=True, help="curated day YYYY-MM-DD")
    drift.set_defaults(handler=cmd_drift)

    deploy = sub.add_parser(
        "deploy", parents=[common], help="build the bento, run the serving check, deploy (default: champion)"
    )
    deploy.add_argument("version", nargs="?")
    deploy.add_argument("--stage", choices=["canary", "full"], default="full")
    deploy.add_argument("--skip-check", action="store_true", help="deploy without the serving check")
    deploy.add_argument("--by", help="who deploys (default: the current user)")
    deploy.add_argument("--reason")
    deploy.set_defaults(handler=cmd_deploy)

    rollback = sub.add_parser(
        "rollback", parents=[common], help="serve the previous (or a named) version again"
    )
    rollback.add_argument("--to", help="model version to return to (default: the previous one)")
    rollback.add_argument("--reason", required=True, help="why (recorded in the audit)")
    rollback.add_argument("--by", help="who rolls back (default: the current user)")
    rollback.set_defaults(handler=cmd_rollback)

    monitor = sub.add_parser(
        "monitor", parents=[common], help="check the live endpoint: latency, errors, live accuracy, drift"
    )
    monitor.add_argument("--no-alerts", action="store_true", help="judge and record, send nothing")
    monitor.add_argument("--no-rollback", action="store_true", help="never roll back automatically")
    monitor.set_defaults(handler=cmd_monitor)

    serve = sub.add_parser("serve", parents=[common], help="run the live prediction service (BentoML)")
    serve.add_argument("--port", type=int, help="default: serving.port")
    serve.set_defaults(handler=cmd_serve)

    config = sub.add_parser("config", parents=[common], help="print the effective config")
    config.set_defaults(handler=cmd_config)
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
    from ml.deploy import DeployError
    from ml.ingest import BatchRejected, NothingLanded

    args = build_parser().parse_args(argv)
    handler: Callable[[Settings, argparse.Namespace], dict[str, Any]] = args.handler
    try:
        settings = load_settings(args.config)
        _emit(handler(settings, args), args.json)
        return EXIT_OK
    except ConfigError as exc:
        _emit({"error": str(exc), "type": "config"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    except BatchRejected as exc:
        _emit({"error": str(exc), "type": "batch_rejected", "result": exc.result}, args.json)
        return EXIT_REJECTED
    except NothingLanded as exc:
        _emit(
            {"error": str(exc), "type": "nothing_landed"}, args.json, sys.stdout if args.json else sys.stderr
        )
        return EXIT_NOTHING
    except DeployError as exc:
        _emit({"error": str(exc), "type": "deploy"}, args.json, sys.stdout if args.json else sys.stderr)
        return EXIT_REJECTED
    except ValueError as exc:
        _emit(
            {"error": str(exc), "type": "invalid_argument"},
            args.json,
            sys.stdout if args.json else sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
