"""95% intervals by bootstrapping prompts, and paired differences against the baseline.

The unit of resampling is the prompt: a prompt's generations are correlated (one caption, one learned
image), so they are drawn together. Every variant generates for the same prompts with the same seeds, so a
comparison with the baseline resamples the *same* prompts for both and bootstraps the difference itself,
which is far tighter than two separate intervals when the two models agree on which prompts are hard.
The percentile interval is used: simple, and adequate for means of bounded per-prompt values.

FD and KID are statistics of a *set* of images, and a bootstrap draw with replacement holds some
generations twice: that shrinks the set's spread and inflates both (measured on the embedded baseline: FD
12.3 with a bootstrap interval of [12.3, 43.0], the point at its bottom). For them `halves` is used
instead, the delete-half jackknife (Shao and Wu, 1989): the figure on random halves of the prompts, drawn
without replacement; for d = n/2 deleted the jackknife variance is the plain variance of the half-sample
figures, and centring them on their mean removes the larger small-sample bias of a half.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ALPHA = 0.05
LOW, HIGH = "ci_low", "ci_high"  # `<figure>/ci_low`, `<figure>/ci_high`: the names DESIGN.md gives


def change_key(key: str) -> str:
    """Where a figure's paired change against the baseline is kept: `replication/rate/dup` ->
    `vs_baseline/replication_rate_dup` (relative change), `.../diff` (difference), `.../significant`."""
    return "vs_baseline/" + key.replace("/", "_")

# statistic of a set of prompts: receives the rows (prompt indices) drawn, returns one number
Statistic = Callable[[np.ndarray], float]


def resamples(n_prompts: int, n: int, seed: int = 0) -> np.ndarray:
    """n x n_prompts prompt indices drawn with replacement (fixed seed: every variant draws the same)."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n, n_prompts))


def halves(n_prompts: int, n: int, seed: int = 0) -> np.ndarray:
    """n x (n_prompts // 2) prompt indices: random halves, drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_prompts)[: n_prompts // 2] for _ in range(n)])


def interval(statistic: Statistic, n_prompts: int, n: int, seed: int = 0, method: str = "bootstrap") -> tuple[float, float, float]:
    """The statistic on all prompts, and its 95% interval: percentile bootstrap, or for a set statistic
    (method "halves") the point plus the centred quantiles of the half-sample figures."""
    out = with_intervals(lambda rows: {"x": statistic(rows)}, n_prompts, n, seed, method)
    return out["x"], out[f"x/{LOW}"], out[f"x/{HIGH}"]


def with_intervals(statistics: Callable[[np.ndarray], dict[str, float]], n_prompts: int, n: int,
                   seed: int = 0, method: str = "bootstrap") -> dict[str, float]:
    """`with_interval` for a statistic that returns several figures at once (computed once per draw)."""
    point = statistics(np.arange(n_prompts))
    rows = resamples(n_prompts, n, seed) if method == "bootstrap" else halves(n_prompts, n, seed)
    draws = [statistics(r) for r in rows]
    out: dict[str, float] = {}
    for key, value in point.items():
        values = np.array([d[key] for d in draws], dtype=float)
        values = values[np.isfinite(values)]
        if method == "halves" and len(values):
            values = value + values - values.mean()
        low, high = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2]) if len(values) and n_prompts > 1 else (float("nan"),) * 2
        out |= {key: value, f"{key}/{LOW}": float(low), f"{key}/{HIGH}": float(high)}
    return out


def mean_of(per_prompt: np.ndarray) -> Statistic:
    """The mean over prompts of a per-prompt value (e.g. the share of its generations that replicate)."""
    per_prompt = np.asarray(per_prompt, dtype=float)
    return lambda rows: float(per_prompt[rows].mean())


def with_interval(key: str, statistic: Statistic, n_prompts: int, n: int, method: str = "bootstrap") -> dict[str, float]:
    """`key`, `key/ci_low` and `key/ci_high`: the point figure and its interval."""
    point, low, high = interval(statistic, n_prompts, n, method=method)
    return {key: point, f"{key}/{LOW}": low, f"{key}/{HIGH}": high}


def paired(key: str, variant: Statistic, baseline: Statistic, n_prompts: int, n: int,
           method: str = "bootstrap") -> dict[str, float]:
    """The change against the baseline on the same prompts, absolute and relative, each with its interval,
    and whether it is significant (+1 higher, -1 lower, 0 inside the noise): whether the difference's
    interval excludes 0 (the relative change's, for a set statistic's half-sample intervals)."""
    name = change_key(key)

    def changes(rows):
        v, b = variant(rows), baseline(rows)
        return {f"{name}/diff": v - b, name: v / b - 1.0 if b else float("nan")}

    out = with_intervals(changes, n_prompts, n, method=method)
    # a bootstrap draw's difference and ratio have the same sign, so either interval decides; the centred
    # half-sample intervals of a set statistic differ, and its ratio is the steadier (a half inflates
    # FD for both models alike, multiplicatively), the one the report shows and the policy reads
    judged = f"{name}/diff" if method == "bootstrap" else name
    low, high = out[f"{judged}/{LOW}"], out[f"{judged}/{HIGH}"]
    out[f"{name}/significant"] = float(np.sign(low) if np.sign(low) == np.sign(high) else 0.0)
    return out


def per_prompt(values: np.ndarray, per_prompt_count: int) -> np.ndarray:
    """Per-generation values (prompt-major, as generation_plan orders them) to per-prompt means."""
    return np.asarray(values, dtype=float).reshape(-1, per_prompt_count).mean(1)
