"""95% intervals over prompts, paired changes against the baseline, and their p-values.

The unit of resampling is the prompt: a prompt's generations are correlated (one caption, one learned
image), so they are drawn together. Every variant generates for the same prompts with the same seeds, so a
comparison with the baseline draws the *same* prompts for both and reads the interval of the difference
itself, far tighter than two separate intervals when the two models agree on which prompts are hard.

Rates and other means over prompts (method "bootstrap"): the percentile bootstrap over prompts. A paired
change is the difference variant - baseline on each resample; its two-sided p-value is 2 x the smaller
share of resampled differences at or below 0 and at or above 0, at least 1 / (resamples + 1).

FD and KID are statistics of a *set* of images (method "halves"). A bootstrap draw with replacement holds
some generations twice, which shrinks the set's spread and inflates both. They are computed instead on
random halves of the prompts, drawn without replacement: the delete-half jackknife (Shao and Wu, 1989),
whose variance for d = n/2 deleted is the plain variance of the half-sample figures. FD also has a
small-sample bias: about 5 on a population FD of 9 with 32-d features and 80 generations, and twice that
on a half. The bias depends on the spread of the generations, so it does not cancel between a variant
and the baseline when one of them is less diverse. The jackknife removes it: the figure reported is
2 x (figure on all prompts) - (mean figure on the halves), and its interval is that figure plus the
halves' deviations from their mean, read at 2.5% and 97.5%. In a paired comparison each model is corrected
on the same halves. The judged figure is the difference `vs_baseline/<key>/diff`. Its interval gives
`/significant` and its p-value is computed as for the bootstrap, on those centred draws. The relative
change `vs_baseline/<key>` is that difference in units of the baseline's figure on all prompts before the
correction (`vs_baseline/<key>/scale`), with the difference's interval on the same scale. A ratio of the
two corrected figures is not used: the corrected baseline FD is near 0, or below it, when the population FD
is small beside its bias (-1.5 on the default's holdout prompts), and a ratio there is undefined or wild.
The uncorrected FD is always above 0, so FD's relative change is always defined, and judging it against a
tolerance is judging the corrected difference against tolerance x that scale. The scale is a reading at this
design: its bias part shrinks with more generations, so the same difference is a larger share at more
prompts. KID's uncorrected figure is an unbiased estimate that can be 0 or below; its relative change is
then undefined (nan) and its difference alone is read.

Coverage at 95% nominal: the share of simulated data sets whose interval holds the known truth, in the
settings of tests/test_coverage.py (40 prompts x 2 generations), which checks each method with 200 to 400
data sets. The figures here come from more data sets in the same settings:
- a rate, prompts of heterogeneous copy probability (Beta(1, 2)): 0.93 (2000 data sets). At a rate of
  0.05 (Beta(0.2, 3.8)) the percentile bootstrap gives 0.88: for rare copies it is somewhat narrow.
- the paired difference of two rates: 0.93 with a difference, 0.95 without one (2000 each).
- FD with 32-d features and 200 real reference images, with the variant shifted and less diverse (600
  data sets): the corrected difference 0.96 (its relative change is the same interval rescaled), one
  model's corrected FD 0.93. The
  uncorrected difference gave 0.05, the ratio of the half-sample figures 0.00, the uncorrected FD 0.00.
  The truth there is the population's FD against the reference set that was used. Drawing a new
  reference set each time adds its own noise, which no resampling of prompts can see (the corrected
  difference then covered 0.89).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ALPHA = 0.05
LOW, HIGH = "ci_low", "ci_high"  # `<figure>/ci_low`, `<figure>/ci_high`: the names DESIGN.md gives


def change_key(key: str) -> str:
    """Where a figure's paired change against the baseline is kept: `replication/rate/dup` ->
    `vs_baseline/replication_rate_dup` (relative change), `.../diff` (difference), `.../diff/p` (its
    p-value), `.../significant`."""
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
    """The statistic and its 95% interval: on all prompts with the percentile bootstrap, or for a set
    statistic (method "halves") the bias-corrected figure with the centred half-sample quantiles."""
    out = with_intervals(lambda rows: {"x": statistic(rows)}, n_prompts, n, seed, method)
    return out["x"], out[f"x/{LOW}"], out[f"x/{HIGH}"]


def with_intervals(statistics: Callable[[np.ndarray], dict[str, float]], n_prompts: int, n: int,
                   seed: int = 0, method: str = "bootstrap") -> dict[str, float]:
    """`interval` for a statistic that returns several figures at once (computed once per draw)."""
    point, draws = _draws(statistics, n_prompts, n, seed, method)
    out: dict[str, float] = {}
    for key, value in point.items():
        values = draws[key][np.isfinite(draws[key])]
        if method == "halves" and len(values):
            value, values = _jackknifed(value, values)
        low, high = _bounds(values, n_prompts)
        out |= {key: float(value), f"{key}/{LOW}": low, f"{key}/{HIGH}": high}
    return out


def _draws(statistics: Callable[[np.ndarray], dict[str, float]], n_prompts: int, n: int, seed: int,
           method: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The figures on all prompts, and each figure on every resample (bootstrap) or random half (halves)."""
    if method not in ("bootstrap", "halves"):
        raise ValueError(f"method {method!r}: 'bootstrap' or 'halves'")
    point = statistics(np.arange(n_prompts))
    rows = resamples(n_prompts, n, seed) if method == "bootstrap" else halves(n_prompts, n, seed)
    figures = [statistics(r) for r in rows]
    return point, {key: np.array([f[key] for f in figures], dtype=float) for key in point}


def _jackknifed(value: float, half_values: np.ndarray) -> tuple[float, np.ndarray]:
    """A set statistic's bias-corrected figure, 2 x (figure on all prompts) - (mean figure on the halves),
    and the draws its interval is read from: that figure plus each half's deviation from the halves' mean."""
    mean = half_values.mean()
    corrected = 2 * value - mean
    return corrected, corrected + half_values - mean


def _bounds(values: np.ndarray, n_prompts: int) -> tuple[float, float]:
    if not len(values) or n_prompts < 2:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def p_value(draws: np.ndarray) -> float:
    """Two-sided p-value of "the change is 0" from the draws of the change: 2 x the smaller share of draws
    on either side of 0 (0 itself counted on both), at least 1 / (draws + 1), at most 1; nan without draws."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan")
    share = min(np.mean(draws <= 0), np.mean(draws >= 0))
    return float(min(1.0, max(2 * share, 1 / (len(draws) + 1))))


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
    """The change against the baseline on the same prompts: the difference variant - baseline
    (`vs_baseline/<key>/diff`) with its interval and two-sided p-value (`.../diff/p`), the relative change
    variant / baseline - 1 (`vs_baseline/<key>`) with its interval, and `.../significant`: +1 higher, -1
    lower, 0 inside the noise, whether the difference's interval excludes 0.

    Both figures are computed on every draw, so the draws pair them. With method "halves" each figure is
    the jackknife's bias-corrected one and the draws are centred (`_jackknifed`), each model's separately on
    the same halves: the difference's draws are the corrected difference plus each half's deviation of
    variant - baseline, and the relative change is the difference over the baseline's uncorrected figure
    (`.../scale`). With the bootstrap the relative change is the ratio minus 1 on every draw. Either is
    defined where its denominator is above 0."""
    name, diff = change_key(key), change_key(key) + "/diff"
    point, draws = _draws(lambda rows: {"v": variant(rows), "b": baseline(rows)}, n_prompts, n, 0, method)
    finite = np.isfinite(draws["v"]) & np.isfinite(draws["b"])
    v, b, v_draws, b_draws = point["v"], point["b"], draws["v"][finite], draws["b"][finite]
    out = {}
    if method == "halves" and finite.any():
        scale = out[f"{name}/scale"] = float(b)  # the baseline's figure before correction: the relative unit
        v, v_draws = _jackknifed(v, v_draws)
        b, b_draws = _jackknifed(b, b_draws)
        relative = (v - b) / scale if scale > 0 else float("nan")
        relative_draws = (v_draws - b_draws) / scale if scale > 0 else np.full(len(v_draws), np.nan)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = v / b - 1.0 if b > 0 else float("nan")
            relative_draws = np.where(b_draws > 0, v_draws / b_draws - 1.0, np.nan)
    out |= {name: float(relative), diff: float(v - b), f"{diff}/p": p_value(v_draws - b_draws)}
    out[f"{name}/{LOW}"], out[f"{name}/{HIGH}"] = _bounds(relative_draws[np.isfinite(relative_draws)], n_prompts)
    low, high = _bounds(v_draws - b_draws, n_prompts)
    out[f"{diff}/{LOW}"], out[f"{diff}/{HIGH}"] = low, high
    out[f"{name}/significant"] = float(np.sign(low) if np.sign(low) == np.sign(high) else 0.0)
    return out


def per_prompt(values: np.ndarray, per_prompt_count: int) -> np.ndarray:
    """Per-generation values (prompt-major, as generation_plan orders them) to per-prompt means."""
    return np.asarray(values, dtype=float).reshape(-1, per_prompt_count).mean(1)
