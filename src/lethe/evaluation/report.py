"""The report's parts: one table of every variant's metrics, the detection section and the
replication-against-FD trade-off plot (the `report` stage puts them together)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lethe.files import variant_metrics  # noqa: E402
from lethe.paths import DETECT_METRICS, LOCALIZE_METRICS  # noqa: E402

# (column title, metric key): the comparison a reader wants first
COLUMNS = (
    ("replication rate (dup)", "replication/rate/dup"),
    ("replication rate (unique)", "replication/rate/unique"),
    ("replication rate (holdout)", "replication/rate/holdout"),
    ("dup rate vs baseline", "vs_baseline/replication_rate_dup"),
    ("FD vs baseline", "vs_baseline/fd_holdout"),
    ("top-1 sim p95 (dup)", "replication/sim_p95/dup"),
    ("nn-ratio rate (dup)", "replication/nn_ratio_rate/dup"),
    ("FD (holdout)", "quality/fd/holdout"),
    ("prompt accuracy (holdout)", "quality/prompt_accuracy/holdout"),
    ("diversity (holdout)", "quality/diversity/holdout"),
    ("train s", "cost/train_seconds"),
    ("trainable params", "cost/trainable_params"),
    ("s / image", "cost/seconds_per_image"),
)
TRADEOFF_X, TRADEOFF_Y = "quality/fd/holdout", "replication/rate/dup"


def load_metrics(variants) -> dict[str, dict[str, float]]:
    return with_baseline_changes(variant_metrics(variants))


def with_baseline_changes(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add each variant's relative change of dup replication rate and FD against the baseline's."""
    base = metrics.get("baseline")
    if base is None:
        return metrics
    changes = {"vs_baseline/replication_rate_dup": "replication/rate/dup", "vs_baseline/fd_holdout": "quality/fd/holdout"}
    out = {}
    for variant, values in metrics.items():
        extra = {new: values[key] / base[key] - 1.0 for new, key in changes.items()
                 if base.get(key) and values.get(key) is not None}
        out[variant] = {**values, **extra}
    return out


def _cell(value, key: str = "") -> str:
    if value is None:
        return "–"
    if key.startswith("vs_baseline/"):
        return f"{value:+.0%}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def markdown_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = ["| variant | " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for variant, values in metrics.items():
        lines.append(f"| {variant} | " + " | ".join(_cell(values.get(key), key) for _, key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def html_table(metrics: dict[str, dict[str, float]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(v)}</td>" + "".join(f"<td>{_cell(m.get(k), k)}</td>" for _, k in COLUMNS) + "</tr>"
        for v, m in metrics.items()
    )
    return (f"<!doctype html><meta charset='utf-8'><title>lethe report</title>"
            f"<table border='1' cellpadding='4'><tr><th>variant</th>{head}</tr>{rows}</table>\n")


def tradeoff_points(metrics: dict[str, dict[str, float]]) -> list[dict]:
    return [{"variant": v, "fd": m.get(TRADEOFF_X), "replication_rate": m.get(TRADEOFF_Y)} for v, m in metrics.items()]


def tradeoff_png(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for p in points:
        ax.scatter(p["fd"], p["replication_rate"])
        ax.annotate(p["variant"], (p["fd"], p["replication_rate"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("FD, holdout prompts (lower is better)")
    ax.set_ylabel("replication rate, dup prompts (lower is better)")
    ax.set_title("memorization against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DETECTION_SCORES = ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim")


def detection_section(path: Path = DETECT_METRICS, localize: Path = LOCALIZE_METRICS) -> str:
    """The detect stage's AUROC and TPR@1%FPR per score, and NeMo's neuron counts, when those stages ran."""
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    lines = ["", "## Detection on the baseline", "",
             "| score | AUROC (measured) | TPR@1%FPR (measured) | AUROC (planted) | TPR@1%FPR (planted) |",
             "|---|---|---|---|---|"]
    for score in DETECTION_SCORES:
        cells = [d.get(f"detection/{score}/{k}") for k in ("auroc", "tpr_at_1pct_fpr", "planted_auroc", "planted_tpr_at_1pct_fpr")]
        lines.append(f"| {score} | " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    lines.append("measured: prompts whose baseline generations replicate a training image, against the rest; "
                 "planted: dup prompts against holdout prompts. Memorized share (measured): "
                 + ", ".join(f"{g} {_cell(d.get(f'detection/memorized_share/{g}'))}" for g in ("dup", "unique", "holdout")))
    if localize.exists():
        n = json.loads(localize.read_text())
        lines += ["", "## NeMo neurons", "",
                  f"tau_mem {_cell(n['nemo/tau_mem'])}; memorized target prompts {n['nemo/memorized_prompts']:.0f}, "
                  f"localized {n['nemo/localized_prompts']:.0f}; median neurons per prompt {_cell(n['nemo/median_neurons'])}; "
                  f"union deactivated in evaluate@nemo: {n['nemo/union_neurons']:.0f} (table: reports/localize/neurons.md)"]
    return "\n".join(lines) + "\n"
