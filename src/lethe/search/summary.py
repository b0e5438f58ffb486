"""MemControl's part of the report: the Pareto front, and the chosen mask beside full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

from lethe.paths import CHOSEN_MASK



def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _number(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def memcontrol_section(metrics: dict[str, dict[str, float]], path: Path = CHOSEN_MASK) -> str:
    """Markdown, or nothing when the search has not run."""
    if not path.exists():
        return ""
    chosen = json.loads(path.read_text())
    base = chosen["trainable_params"] / chosen["trainable_share"]  # U-Net + text encoder parameters
    lines = ["", "## MemControl", "",
             f"Study `{chosen['study']}`, family `{chosen['family']}`; chosen: trial {chosen['trial']} "
             f"({chosen['policy']}). Search objectives at the trial budget: memorization = Wen's noise magnitude "
             "on the planted duplicates, FD = generations from holdout prompts.", "",
             _row(["trial", "blocks trained", "lr", "memorization", "FD", "prompt accuracy", "trainable share"]),
             "|---|---|---|---|---|---|---|"]
    for t in sorted(chosen["pareto_front"], key=lambda t: t["memorization"]):
        mark = " (chosen)" if t["trial"] == chosen["trial"] else ""
        lines.append(_row([f"{t['trial']}{mark}", ", ".join(t["blocks"]), f"{t['lr']:.2e}", f"{t['memorization']:.3f}",
                           f"{t['fd']:.3f}", _number(t.get("prompt_accuracy"), ".2f"), f"{t['trainable_share']:.2%}"]))
    full = chosen.get("reference")
    if full:
        lines.append(_row(["full fine-tuning", "everything", "finetune.lr", f"{full['memorization']:.3f}",
                           f"{full['fd']:.3f}", _number(full.get("prompt_accuracy"), ".2f"),
                           f"{full['cost/trainable_share']:.2%}"]))
    lines += ["", "At the full `finetune` budget (plot: reports/memcontrol/pareto.png):", "",
              _row(["variant", "trainable share", "replication rate (dup)", "FD (holdout)", "prompt accuracy (holdout)"]),
              "|---|---|---|---|---|"]
    for variant in ("baseline", "memcontrol"):
        m = metrics.get(variant)
        if m:
            share = m.get("cost/trainable_params", float("nan")) / base
            lines.append(_row([variant, f"{share:.2%}", f"{m.get('replication/rate/dup', float('nan')):.3f}",
                               f"{m.get('quality/fd/holdout', float('nan')):.3f}",
                               _number(m.get("quality/prompt_accuracy/holdout"), ".2f")]))
    return "\n".join(lines) + "\n"
