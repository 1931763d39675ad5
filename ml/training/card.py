"""The model card: what a reviewer reads before approving a promotion (JSON + Markdown).

Data version and class support, metrics with CIs, slices, robustness, calibration, explanations,
every gate verdict, the approval route and the known limits, all from the validation report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

MODEL_CARD_MD = "validation/model_card.md"
MODEL_CARD_JSON = "validation/model_card.json"


def class_support(rows: pd.DataFrame, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Images per split and class."""
    counts = rows.groupby(["split", "label"]).size()
    return {
        split: {name: int(counts.get((split, name), 0)) for name in classes}
        for split in ("train", "val", "test")
    }


def _ci(metric: dict[str, float] | None, digits: int = 3) -> str:
    if not metric:
        return "n/a"
    return f"{metric['value']:.{digits}f} [{metric['low']:.{digits}f}, {metric['high']:.{digits}f}]"


def known_limits(validation: dict[str, Any], min_support: int) -> list[str]:
    """What the figures cannot tell, read off the report."""
    slices = validation["slices"]
    small = [s["name"] for s in slices if not s["judged"]]
    attacks = validation["adversarial"]
    corruption = min(validation["robustness"]["results"], key=lambda r: r["accuracy"]["value"], default=None)
    limits = [
        f"test split of {validation['n_test']} images: every figure carries its 95% interval, and small "
        "slices have wide ones",
        "the corruption suite is synthetic (seven kinds at three severities), not a sample of real "
        "degradations",
        f"adversarial accuracy is measured on {attacks[0]['n'] if attacks else 0} images only, with FGSM and "
        f"a {validation['pgd_steps']}-step PGD: a stronger attack can only lower it",
        "conformal coverage holds on average over images like the validation split's, not per class or slice",
        "Grad-CAM maps have the backbone's last-convolution resolution (7 x 7 at 224 px)",
    ]
    if small:
        limits.append(f"slices under {min_support} test images are reported, not judged: {', '.join(small)}")
    if corruption is not None:
        limits.append(
            f"weakest corruption: {corruption['corruption']} at severity {corruption['severity']} "
            f"(accuracy {_ci(corruption['accuracy'])})"
        )
    return limits


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _robustness_lines(robustness: dict[str, Any], adversarial: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Robustness",
        "",
        f"Clean accuracy on the sample {_ci(robustness['clean_accuracy'])} (n={robustness['n']}); mean under "
        f"corruptions {_ci(robustness['mean_accuracy'])}, {_ci(robustness['ratio_to_clean'], 2)} of clean.",
        "",
    ]
    by_kind: dict[str, dict[int, str]] = {}
    for result in robustness["results"]:
        by_kind.setdefault(result["corruption"], {})[result["severity"]] = _ci(result["accuracy"])
    severities = [[kind, *(cells.get(s, "") for s in (1, 2, 3))] for kind, cells in by_kind.items()]
    attacks = [[a["attack"], a["eps"], a["n"], _ci(a["accuracy"])] for a in adversarial]
    lines += _table(["corruption", "severity 1", "severity 2", "severity 3"], severities)
    return [*lines, "", *_table(["attack", "eps (/255)", "n", "accuracy"], attacks), ""]


def _slice_lines(slices: list[dict[str, Any]]) -> list[str]:
    rows = [
        [s["name"], s["support"], _ci(s["accuracy"]), _ci(s["gap"]), s["judged"], s["passed"]] for s in slices
    ]
    return [
        "## Slices",
        "",
        *_table(["slice", "n", "accuracy", "rest - slice", "judged", "passed"], rows),
        "",
    ]


def _calibration_lines(calibration: dict[str, Any], deletion: dict[str, Any]) -> list[str]:
    return [
        "## Calibration and abstention",
        "",
        f"Temperature {calibration['temperature']} (fitted on {calibration['n_calibration']} validation "
        f"images). ECE on test {_ci(calibration['ece_before'])} before, {_ci(calibration['ece_after'])} "
        f"after. Conformal sets (target {calibration['target_coverage']}): coverage "
        f"{_ci(calibration['coverage'])}, mean size {_ci(calibration['mean_set_size'], 2)}, abstention rate "
        f"{_ci(calibration['abstain_rate'])}.",
        "",
        "## Explanations",
        "",
        f"Deletion test (n={deletion['n']}): AUC with Grad-CAM order {_ci(deletion['auc_attributed'])}, "
        f"random order {_ci(deletion['auc_random'])}; Wilcoxon p={deletion['p_value']:.3g} "
        f"({'passed' if deletion['passed'] else 'failed'}).",
        "",
    ]


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown."""
    model, data, metrics, validation = card["model"], card["data"], card["metrics"], card["validation"]
    support = data["class_support"]
    lines = [
        f"# Model card: {model['registered_model']} (run {model['run_id']})",
        "",
        f"Architecture {model['architecture']} (weights {model['backbone_weights']}, "
        f"{model.get('precision', 'fp32')}), preprocessing "
        f"`{model['preprocessing']}`, classes {', '.join(model['classes'])}.",
        f"Dataset version {data['dataset_version']} from {data['storage_root']}.",
        "",
        *_table(["split", *model["classes"]], [[s, *support[s].values()] for s in support]),
        "",
        "## Metrics (test split)",
        "",
        f"Accuracy {_ci(metrics['accuracy'])}, macro F1 {_ci(metrics['f1_macro'])}, "
        f"macro ROC AUC {_ci(metrics.get('roc_auc_macro'))} (n={metrics['n']}).",
        "",
        *_slice_lines(validation["slices"]),
        *_robustness_lines(validation["robustness"], validation["adversarial"]),
        *_calibration_lines(validation["calibration"], validation["deletion"]),
        "## Gate",
        "",
        f"**{'passed' if card['gate']['passed'] else 'failed'}**",
        "",
        *(
            f"- {'pass' if c['passed'] else 'FAIL'} `{c['name']}`: {c['detail']}"
            for c in card["gate"]["checks"]
        ),
        "",
        "## Approval",
        "",
        card["approval"]["reason"],
        "",
        "## Known limits",
        "",
        *(f"- {limit}" for limit in card["known_limits"]),
    ]
    return "\n".join(lines) + "\n"
