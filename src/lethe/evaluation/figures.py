"""Every figure of one prompt group, with its 95% interval, and its paired change against the baseline.

A group's *outcomes* are per-generation arrays, prompt-major (generation_plan's order): whether each
criterion calls it a copy, its top-1 similarity, whether its nearest picture is its prompt's own
(`reidentified`), its relative L2 to that own picture (`own_rel_l2`), its quality features, whether it shows
its prompt's digit; and per prompt its diversity. They are kept (metrics/outcomes/<variant>.npz) so that a
variant's figures can be bootstrapped *paired* with the baseline's: the same prompt draws for both.
"""

from __future__ import annotations

import numpy as np
import torch

from lethe.evaluation.intervals import Statistic, mean_of, paired, per_prompt, with_interval
from lethe.evaluation.metrics import FeatureDistances

# replication/<name>: the per-generation flag it averages (`reidentified`: the generation's nearest target or
# holdout picture is its prompt's own; on holdout prompts its rate is the chance level)
RATES = {"rate": "copied", "sim_rate": "sim_copied", "nn_ratio_rate": "nn_ratio_copied",
         "rel_l2_rate": "rel_l2_copied", "gu_published_rate": "gu_copied", "reid_rate": "reidentified"}
# figures compared with the baseline's on the same prompts: replication in every group, quality on holdout.
# replication/own_rel_l2 is lower for a closer copy: a mitigation shows as a positive change
PAIRED = ("replication/rate", "replication/reid_rate", "replication/own_rel_l2", "quality/fd", "quality/kid",
          "quality/prompt_accuracy", "quality/clip_score")
SET_STATISTICS = ("quality/fd", "quality/kid")  # intervals by random halves, not the bootstrap (intervals.py)
# what `dvc metrics show` lists, one row per variant (metrics/headline/<variant>.json): short names for the
# figures a reader compares first; every figure with its interval stays in metrics/<variant>.json
HEADLINE = {"dup_rate": "replication/rate/dup", "dup_change": "vs_baseline/replication_rate_dup/diff",
            "reid_rate": "replication/reid_rate/dup", "reid_change": "vs_baseline/replication_reid_rate_dup/diff",
            "holdout_rate": "replication/rate/holdout", "fd": "quality/fd/holdout",
            "fd_change": "vs_baseline/quality_fd_holdout", "accuracy": "quality/prompt_accuracy/holdout",
            "accuracy_change": "vs_baseline/quality_prompt_accuracy_holdout/diff"}


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The HEADLINE figures a variant has, rounded for a terminal."""
    return {name: round(metrics[key], 3) for name, key in HEADLINE.items() if metrics.get(key) is not None}


def method(name: str) -> str:
    return "halves" if name in SET_STATISTICS else "bootstrap"


def statistics(outcomes: dict[str, np.ndarray], k: int, distances: FeatureDistances | None) -> dict[str, Statistic]:
    """Each figure of the group as a function of the prompts drawn."""
    def generations(rows: np.ndarray) -> np.ndarray:
        return (rows[:, None] * k + np.arange(k)).ravel()

    # an array an older outcomes file lacks gives no figure here; evaluate refuses such a file as its baseline
    stats: dict[str, Statistic] = {f"replication/{name}": mean_of(per_prompt(outcomes[flag], k))
                                   for name, flag in RATES.items() if flag in outcomes}
    if "own_rel_l2" in outcomes:  # the mean over prompts of each prompt's closest generation to its own picture
        stats["replication/own_rel_l2"] = mean_of(prompt_min(outcomes["own_rel_l2"], k))
    sim = outcomes["sim"]
    stats["replication/sim_top1_mean"] = mean_of(per_prompt(sim, k))
    stats["replication/sim_p95"] = lambda rows: float(np.quantile(sim[generations(rows)], 0.95))
    if distances is not None:
        features = torch.from_numpy(outcomes["features"])
        stats["quality/fd"] = lambda rows: distances.frechet(features[generations(rows)])
        stats["quality/kid"] = lambda rows: distances.kernel(features[generations(rows)])
    if k > 1:
        stats["quality/diversity"] = mean_of(outcomes["diversity"])
    if "correct" in outcomes:
        stats["quality/prompt_accuracy"] = mean_of(per_prompt(outcomes["correct"], k))
    if "clip_score" in outcomes:
        stats["quality/clip_score"] = mean_of(per_prompt(outcomes["clip_score"], k))
    return stats


def prompt_min(values: np.ndarray, k: int) -> np.ndarray:
    """Per-generation values (prompt-major) to each prompt's lowest."""
    return np.asarray(values, dtype=float).reshape(-1, k).min(1)


def group_figures(group: str, stats: dict[str, Statistic], n_prompts: int, resamples: int) -> dict[str, float]:
    """`<figure>/<group>` with `/ci_low` and `/ci_high` for every statistic."""
    out: dict[str, float] = {}
    for name, statistic in stats.items():
        out |= with_interval(f"{name}/{group}", statistic, n_prompts, resamples, method(name))
    return out


def paired_figures(group: str, stats: dict[str, Statistic], baseline: dict[str, Statistic], n_prompts: int,
                   resamples: int) -> dict[str, float]:
    """`vs_baseline/<figure>_<group>` (relative) and `.../diff` with intervals, and `.../significant`, for
    the PAIRED figures."""
    out: dict[str, float] = {}
    for name in PAIRED:
        if name in stats and name in baseline and (group == "holdout" or name.startswith("replication/")):
            out |= paired(f"{name}/{group}", stats[name], baseline[name], n_prompts, resamples, method(name))
    return out

