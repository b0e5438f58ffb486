"""The `report` stage: one table of every variant's metrics and a replication-against-FD trade-off plot.

The same numbers reach three doors: `reports/report.md` and `.html`, `plots/tradeoff.json` (a DVC
plot), and a `report` run in MLflow with the table and the plot as artifacts.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lethe.files import write_json, write_text  # noqa: E402

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
    metrics = {v: json.loads((Path("metrics") / f"{v}.json").read_text()) for v in variants}
    return with_baseline_changes(metrics)


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


def report(params) -> dict[str, dict[str, float]]:
    import mlflow

    from lethe.tracking import stage_run

    metrics = load_metrics(params.variants)
    points = tradeoff_points(metrics)
    reports = Path("reports")
    write_text(reports / "report.md", "# lethe: variants compared\n\n" + markdown_table(metrics))
    write_text(reports / "report.html", html_table(metrics))
    tradeoff_png(points, reports / "tradeoff.png")
    write_json("plots/tradeoff.json", points)
    with stage_run(params, stage="report", method="report", sections=("evaluate",), data_hash=""):
        for name in ("report.md", "report.html", "tradeoff.png"):
            mlflow.log_artifact(str(reports / name))
    return metrics
