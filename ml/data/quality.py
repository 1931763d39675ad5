"""Great Expectations: load the suites kept in ``expectations/``, validate dataframes, build Data Docs.

Each expectation's ``meta.reason`` names the quarantine reason for the rows it flags;
``meta.gate`` marks table-level expectations whose failure rejects the whole batch.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import REPO_ROOT
from ml.memory import import_long_lived
from ml.storage import Storage, join_key

EXPECTATIONS_DIR = REPO_ROOT / "expectations"
DOCS_SITE = "local"
# What Great Expectations imports and no suite here uses: altair draws the KL-divergence expectation's
# charts; scipy.stats computes that expectation and two Kolmogorov-Smirnov metrics (and imports
# scipy.optimize, sparse, integrate, interpolate, ...). Deferred to their first use (ml.memory's
# stand-ins), GE's import takes 0.7-2.0 s less CPU, by host, and ~640 fewer modules.
GREAT_EXPECTATIONS_DEFERRED = ("altair", "scipy.stats")


@dataclass
class SuiteOutcome:
    """The result of one suite on one dataframe."""

    suite: str
    success: bool
    row_reasons: dict[Any, list[str]] = field(default_factory=dict)  # dataframe index -> reasons
    gate_failures: list[str] = field(default_factory=list)
    failed_expectations: list[str] = field(default_factory=list)
    evaluated: int = 0


def load_suite_spec(name: str) -> dict[str, Any]:
    return json.loads((EXPECTATIONS_DIR / f"{name}.json").read_text())


def _describe(config: Any) -> str:
    column = config.kwargs.get("column")
    return f"{config.type}({column})" if column else config.type


def _outcome_from(suite: str, validation: Any, priority: list[str]) -> SuiteOutcome:
    """Collect failures; a row's reasons are ordered as the suite lists its expectations."""
    outcome = SuiteOutcome(suite=suite, success=bool(validation.success))
    for result in validation.results:
        config = result.expectation_config
        reason = (config.meta or {}).get("reason", config.type)
        outcome.evaluated += 1
        raised = bool(result.exception_info and result.exception_info.get("raised_exception"))
        if not result.success or raised:
            outcome.failed_expectations.append(_describe(config))
            if (config.meta or {}).get("gate") or raised:
                outcome.gate_failures.append(reason)
        for index in (result.result or {}).get("unexpected_index_list") or []:
            outcome.row_reasons.setdefault(index, []).append(reason)
    rank = {reason: position for position, reason in enumerate(priority)}
    for reasons in outcome.row_reasons.values():
        reasons.sort(key=lambda reason: rank.get(reason, len(rank)))
    return outcome


class QualityRunner:
    """One ephemeral GX context per run; every suite validated goes into one Data Docs site, built once
    when it is published (a build per suite rendered the index and compiled GX's templates again)."""

    def __init__(self, run_name: str, run_time: dt.datetime) -> None:
        gx = import_long_lived("great_expectations", defer=GREAT_EXPECTATIONS_DEFERRED)
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self._documented: list[Any] = []  # the validation results and suites the site shows
        self._run_id = RunIdentifier(run_name=run_name, run_time=run_time)
        self._tmp = tempfile.TemporaryDirectory(prefix="mlops-gx-")
        self.docs_dir = Path(self._tmp.name) / "site"
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        # An ephemeral context comes with a site in a temporary folder it has already deleted: a build
        # of every site rendered this run's docs twice and left the second copy (~4 MB a day) behind.
        for site in self.context.get_site_names():
            self.context.delete_data_docs_site(site)
        self.context.add_data_docs_site(
            DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(self.docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self._datasource = self.context.data_sources.add_pandas("pandas")

    def validate(self, suite_name: str, frame: pd.DataFrame, parameters: dict[str, Any]) -> SuiteOutcome:
        from great_expectations.core.expectation_suite import ExpectationSuite
        from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        spec = load_suite_spec(suite_name)
        suite = self.context.suites.add(
            ExpectationSuite(
                name=spec["name"],
                meta=spec.get("meta", {}),
                expectations=[
                    ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta", {}))
                    for e in spec["expectations"]
                ],
            )
        )
        asset = self._datasource.add_dataframe_asset(suite_name)
        batch = asset.add_batch_definition_whole_dataframe("whole")
        definition = self.context.validation_definitions.add(
            self._gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        checkpoint = self.context.checkpoints.add(
            self._gx.Checkpoint(
                name=f"{suite_name}-checkpoint",
                validation_definitions=[definition],
                result_format={"result_format": "COMPLETE"},
            )
        )
        result = checkpoint.run(
            batch_parameters={"dataframe": frame}, expectation_parameters=parameters, run_id=self._run_id
        )
        ((identifier, validation),) = result.run_results.items()
        self._documented += [identifier, ExpectationSuiteIdentifier(name=spec["name"])]
        priority = [e.get("meta", {}).get("reason", e["type"]) for e in spec["expectations"]]
        return _outcome_from(suite_name, validation, priority)

    def publish_docs(self, storage: Storage, prefix: str) -> str:
        """Build the Data Docs site of the suites validated so far and copy it under ``prefix`` in
        storage; return the URL of its index."""
        self.context.build_data_docs(
            site_names=[DOCS_SITE], resource_identifiers=self._documented, build_index=True
        )
        for path in sorted(self.docs_dir.rglob("*")):
            if path.is_file():
                storage.write_bytes(
                    join_key(prefix, path.relative_to(self.docs_dir).as_posix()), path.read_bytes()
                )
        return storage.url(join_key(prefix, "index.html"))

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> QualityRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
