"""Training-run noise in every comparison, and Holm's control across the variants.

`evaluate` bootstraps each change against the baseline over prompts: the same model pair, other prompts.
A re-run of training moves a figure too, often more. The baseline is trained again at further seeds (its
A/A replicates, `baseline_seed<r>`: the same data, prompts and generation seeds, `finetune.seed + r`), and
the spread of a figure over those R runs, s_run with R - 1 degrees of freedom, is its training-run noise.

A variant's change d = variant - baseline compares two training runs, so its variance is the prompt
bootstrap's plus twice a run's:

    var = se_prompts^2 + 2 s_run^2,   se_prompts = (ci_high - ci_low) / (2 x 1.96)

and its 95% interval is d +/- t_{0.975, df} sqrt(var), df by Welch-Satterthwaite from the two parts
(prompts: n - 1; runs: R - 1). With four runs the t quantile is large (3.2 at df 3): what a re-run can
move is not known well from four runs, and the interval says so. The A/A rows (each replicate against the
baseline) go through exactly this procedure, so their stars are the procedure's false alarms.

Multiplicity: the family is every variant's change of each dup replication rate (the copy criterion's
and re-identification's): Holm's step-down over the variants' p-values, separately per criterion. Its
`significant` flag is Holm's; every other figure's is its own 5% test, as the report says.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from lethe.evaluation.intervals import ALPHA, HIGH, LOW, change_key

Z = stats.norm.ppf(1 - ALPHA / 2)
# the primary endpoints: Holm across the variants on each
FAMILY = ("replication/rate/dup", "replication/reid_rate/dup")
# every change the report judges, as (title, change key judged by its difference): the A/A rows' columns and
# the endpoints a re-run is checked on
ENDPOINTS = (("dup rate (copy)", "vs_baseline/replication_rate_dup/diff"),
             ("dup rate (re-identification)", "vs_baseline/replication_reid_rate_dup/diff"),
             ("dup own rel. L2", "vs_baseline/replication_own_rel_l2_dup/diff"),
             ("holdout rate (copy)", "vs_baseline/replication_rate_holdout/diff"),
             ("FD (holdout)", "vs_baseline/quality_fd_holdout/diff"),
             ("KID (holdout)", "vs_baseline/quality_kid_holdout/diff"),
             ("prompt accuracy (holdout)", "vs_baseline/quality_prompt_accuracy_holdout/diff"))


def run_noise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's standard deviation over the baseline's training runs (baseline and its replicates)."""
    if len(runs) < 2:
        return {}
    figures = [k for k, v in runs[0].items() if _is_figure(k) and v is not None]
    spread = {}
    for key in figures:
        values = [r.get(key) for r in runs]
        if all(v is not None and math.isfinite(v) for v in values):
            spread[key] = float(np.std(values, ddof=1))
    return spread


def _is_figure(key: str) -> bool:
    return not key.startswith(("vs_baseline/", "cost/", "prompts/", "train/")) and not key.endswith((LOW, HIGH))


def combine(diff: float, low: float, high: float, run_sd: float, runs: int, n_prompts: int) -> tuple[float, float, float]:
    """(low, high, p) of a change whose prompt interval is [low, high], with two runs' training noise added."""
    prompt_var = ((high - low) / (2 * Z)) ** 2
    run_var = 2 * run_sd ** 2
    var = prompt_var + run_var
    if var == 0:
        return diff, diff, (1.0 if diff == 0 else 0.0)
    df = var ** 2 / (prompt_var ** 2 / max(n_prompts - 1, 1) + run_var ** 2 / max(runs - 1, 1))
    half = stats.t.ppf(1 - ALPHA / 2, df) * math.sqrt(var)
    p = 2 * stats.t.sf(abs(diff) / math.sqrt(var), df)
    return diff - half, diff + half, float(p)


def holm(p_values: dict[str, float]) -> dict[str, bool]:
    """Holm's step-down at ALPHA: which hypotheses are rejected, the family-wise error held at ALPHA."""
    ordered = sorted(p_values, key=p_values.get)
    rejected = dict.fromkeys(ordered, False)
    for i, name in enumerate(ordered):
        if p_values[name] > ALPHA / (len(ordered) - i):
            break
        rejected[name] = True
    return rejected


def with_run_noise(metrics: dict[str, dict[str, float]], baseline: str, replicates: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Every variant's changes against the baseline with training-run noise in their intervals (prompt-only
    intervals kept as `.../prompt_ci_low`, `.../prompt_ci_high`), `.../p`, and Holm's flag on the FAMILY.
    Without at least one replicate beside the baseline, the metrics come back as they were, flagged
    `runs/measured` 0. The baseline's entry carries each figure's run noise, `runs/sd/<figure>`."""
    runs = [metrics[baseline]] + [metrics[r] for r in replicates if r in metrics]
    spread = run_noise(runs)
    out = {}
    for variant, values in metrics.items():
        values = dict(values)
        values["runs/measured"] = float(len(runs) if len(runs) > 1 else 0)
        if variant == baseline:
            values |= {f"runs/sd/{figure}": sd for figure, sd in spread.items()}
        if variant != baseline and len(runs) > 1:
            for figure, sd in spread.items():
                values |= _combined(values, figure, sd, len(runs), metrics[baseline].get(figure))
        out[variant] = values
    if len(runs) > 1:
        for figure in FAMILY:
            _holm_family(out, figure, baseline, replicates)
    return out


def _combined(values: dict[str, float], figure: str, sd: float, runs: int, base_point: float | None) -> dict[str, float]:
    name = change_key(figure)
    diff = f"{name}/diff"
    if values.get(diff) is None or values.get(f"{diff}/{LOW}") is None:
        return {}
    group = figure.rsplit("/", 1)[-1]
    n_prompts = int(values.get(f"prompts/{group}", 2))
    low, high, p = combine(values[diff], values[f"{diff}/{LOW}"], values[f"{diff}/{HIGH}"], sd, runs, n_prompts)
    sign = float(np.sign(low)) if np.sign(low) == np.sign(high) else 0.0
    out = {f"{diff}/prompt_{LOW}": values[f"{diff}/{LOW}"], f"{diff}/prompt_{HIGH}": values[f"{diff}/{HIGH}"],
           f"{diff}/{LOW}": low, f"{diff}/{HIGH}": high, f"{diff}/p": p, f"{name}/significant": sign}
    # the relative change's unit: a set statistic's recorded scale, else the baseline's figure (a ratio)
    unit = values.get(f"{name}/scale") or base_point
    if unit and values.get(f"{name}/{LOW}") is not None and values.get(name) is not None:
        # the relative change: its own prompt interval (which carries the baseline figure's uncertainty too),
        # with the run noise on the same scale
        rel_low, rel_high, _ = combine(values[name], values[f"{name}/{LOW}"], values[f"{name}/{HIGH}"],
                                       sd / abs(unit), runs, n_prompts)
        out |= {f"{name}/prompt_{LOW}": values[f"{name}/{LOW}"], f"{name}/prompt_{HIGH}": values[f"{name}/{HIGH}"],
                f"{name}/{LOW}": rel_low, f"{name}/{HIGH}": rel_high}
    return out


def _holm_family(metrics: dict[str, dict[str, float]], figure: str, baseline: str, replicates: tuple[str, ...]) -> None:
    """Holm over the candidate variants (the A/A replicates are judged alone: they are the procedure's check)."""
    name = change_key(figure)
    p_values = {v: m[f"{name}/diff/p"] for v, m in metrics.items()
                if v != baseline and v not in replicates and m.get(f"{name}/diff/p") is not None}
    for variant, rejected in holm(p_values).items():
        if not rejected:
            metrics[variant][f"{name}/significant"] = 0.0
        metrics[variant][f"{name}/holm"] = 1.0
