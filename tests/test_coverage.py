"""Coverage of the 95% intervals lethe reports, measured by simulation with a known truth.

Each test draws many data sets from a model whose truth is known in closed form, computes the interval
exactly as the pipeline does (`intervals.interval` / `intervals.paired`), and counts how often it holds
the truth. At 95% nominal, 200 to 400 data sets put the count's standard error near 0.011 to 0.015, so a
method is accepted when its coverage lies in [0.90, 0.99]. The settings are the evaluation's: 40 prompts
x 2 generations, and for FD 32-d features against 200 real reference images.
"""

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.stats import norm

from lethe.evaluation.intervals import change_key, halves, interval, mean_of, paired, per_prompt

COVERAGE = (0.90, 0.99)
PROMPTS, K = 40, 2


def covered(hits: list[bool]) -> float:
    return float(np.mean(hits))


def test_the_prompt_bootstrap_of_a_rate_covers_the_population_rate():
    # prompts differ in how often they are copied: p ~ Beta(1, 2), population rate 1/3
    rng, reps, hits = np.random.default_rng(1), 400, []
    for _ in range(reps):
        p = rng.beta(1.0, 2.0, PROMPTS)
        flags = rng.random((PROMPTS, K)) < p[:, None]
        _, low, high = interval(mean_of(per_prompt(flags.ravel(), K)), PROMPTS, 300)
        hits.append(low <= 1 / 3 <= high)
    assert COVERAGE[0] <= covered(hits) <= COVERAGE[1], covered(hits)


@pytest.mark.parametrize("shift", [0.5, 0.0])
def test_the_paired_bootstrap_of_a_rate_difference_covers_the_true_difference(shift):
    # both models share each prompt's difficulty z and the generation seeds: the same uniform u decides
    # both copies for half the generations, the others the variant draws afresh (its sample diverges from
    # the baseline's); the variant's probit is lower by `shift`. E Phi(a + sigma z) = Phi(a / sqrt(1 + sigma^2))
    a, sigma, reps = -0.3, 1.0, 400
    base_rate, variant_rate = norm.cdf(a / np.hypot(1, sigma)), norm.cdf((a - shift) / np.hypot(1, sigma))
    rng, hits, relative_hits, rejected = np.random.default_rng(2), [], [], []
    name = change_key("replication/rate/dup")
    for _ in range(reps):
        z, u = rng.normal(size=(PROMPTS, 1)), rng.random((PROMPTS, K))
        u_variant = np.where(rng.random((PROMPTS, K)) < 0.5, u, rng.random((PROMPTS, K)))
        base = per_prompt((u < norm.cdf(a + sigma * z)).ravel(), K)
        variant = per_prompt((u_variant < norm.cdf(a - shift + sigma * z)).ravel(), K)
        out = paired("replication/rate/dup", mean_of(variant), mean_of(base), PROMPTS, 300)
        hits.append(out[f"{name}/diff/ci_low"] <= variant_rate - base_rate <= out[f"{name}/diff/ci_high"])
        relative_hits.append(out[f"{name}/ci_low"] <= variant_rate / base_rate - 1 <= out[f"{name}/ci_high"])
        rejected.append(out[f"{name}/diff/p"] < 0.05)
    assert COVERAGE[0] <= covered(hits) <= COVERAGE[1], covered(hits)
    assert COVERAGE[0] <= covered(relative_hits) <= COVERAGE[1], covered(relative_hits)
    if shift == 0.0:  # no difference: the p-value rejects at about its level
        assert np.mean(rejected) <= 0.10
    else:
        assert np.mean(rejected) > 0.5


# FD: generations as Gaussians with a prompt effect shared by a prompt's generations (and by both models: the
# same prompts and seeds), scored against one fixed reference set; the truth is the closed-form FD of each
# model's population of generations against the reference's Gaussian (its mean and covariance, as FD takes
# them). The variant is shifted and less diverse (spread x0.9): its small-sample bias differs from the
# baseline's, so the bias does not cancel in the difference.
DIM, REAL = 32, 200
SCALES = np.linspace(0.6, 1.4, DIM)
PROMPT_SD, SEED_SD = 0.7, 0.7
MODELS = {"baseline": (0.5, 1.0), "variant": (0.6, 0.9)}  # (mean of each coordinate, spread)


def fd_closed_form(mean_1, cov_1, mean_2, cov_2) -> float:
    root = sqrtm(cov_1)
    return float(((mean_1 - mean_2) ** 2).sum() + np.trace(cov_1 + cov_2 - 2 * np.real(sqrtm(root @ cov_2 @ root))))


class FD:
    """FD (torchmetrics' formula) against a fixed reference, for many sets of prompts at once: the
    generations' sums and cross products per prompt, summed with each set's prompt counts."""

    def __init__(self, real: np.ndarray):
        self.mean = real.mean(0)
        cov = np.cov(real.T)
        values, vectors = np.linalg.eigh(cov)
        self.root, self.trace = (vectors * np.sqrt(values.clip(0))) @ vectors.T, np.trace(cov)

    def __call__(self, generations: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """generations: prompts x K x d; counts: sets x prompts (how often each set holds each prompt)."""
        d = generations.shape[-1]
        n = counts.sum(1) * generations.shape[1]
        mean = counts @ generations.sum(1) / n[:, None]
        products = np.einsum("pki,pkj->pij", generations, generations).reshape(len(generations), -1)
        second = (counts @ products).reshape(-1, d, d)
        cov = (second - n[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (n - 1)[:, None, None]
        eigenvalues = np.linalg.eigvalsh(self.root @ cov @ self.root)
        return (((mean - self.mean) ** 2).sum(1) + np.trace(cov, axis1=1, axis2=2) + self.trace
                - 2 * np.sqrt(eigenvalues.clip(0)).sum(1))


def table(values: np.ndarray, sets: np.ndarray):
    """The statistic `paired` calls: a look-up of the figure computed for each set of prompts."""
    figures = {np.sort(rows).tobytes(): v for rows, v in zip(sets, values)}
    return lambda rows: figures[np.sort(np.asarray(rows)).tobytes()]


def test_the_simulation_computes_fd_as_the_pipeline_does():
    from lethe.evaluation.metrics import FeatureDistances

    rng = np.random.default_rng(3)
    real, generations = rng.normal(size=(REAL, DIM)) * SCALES, rng.normal(size=(PROMPTS, K, DIM)) + 0.3
    rows = halves(PROMPTS, 1)
    counts = np.zeros((1, PROMPTS))
    counts[0, rows[0]] = 1
    ours = FD(real)(generations, counts)[0]
    theirs = FeatureDistances(torch.from_numpy(real)).frechet(torch.from_numpy(generations[rows[0]].reshape(-1, DIM)))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fd_intervals_by_bias_corrected_halves_cover_the_population_fd_and_its_change():
    rng, reps, draws = np.random.default_rng(4), 200, 200
    real = rng.normal(size=(REAL, DIM)) * SCALES
    fd, reference = FD(real), (real.mean(0), np.cov(real.T))
    cov = (PROMPT_SD**2 + SEED_SD**2) * np.diag(SCALES**2)
    truth = {m: fd_closed_form(np.full(DIM, mean), spread**2 * cov, *reference) for m, (mean, spread) in MODELS.items()}
    difference, ratio = truth["variant"] - truth["baseline"], truth["variant"] / truth["baseline"] - 1
    sets = [np.arange(PROMPTS), *halves(PROMPTS, draws)]  # what `paired` draws: all prompts, then the halves
    counts = np.zeros((len(sets), PROMPTS))
    for i, rows in enumerate(sets):
        counts[i, rows] = 1
    name = change_key("quality/fd/holdout")
    hits = {k: [] for k in ("diff", "relative", "baseline", "uncorrected diff", "ratio of halves")}
    p_values = []
    for _ in range(reps):
        prompt, seed = rng.normal(size=(PROMPTS, 1, DIM)), rng.normal(size=(PROMPTS, K, DIM))
        figures = {m: fd(mean + spread * SCALES * (PROMPT_SD * prompt + SEED_SD * seed), counts)
                   for m, (mean, spread) in MODELS.items()}
        stat = {m: table(f, sets) for m, f in figures.items()}
        out = paired("quality/fd/holdout", stat["variant"], stat["baseline"], PROMPTS, draws, method="halves")
        hits["diff"].append(out[f"{name}/diff/ci_low"] <= difference <= out[f"{name}/diff/ci_high"])
        # the relative change is the difference over the baseline's uncorrected FD: the same interval rescaled
        scale = out[f"{name}/scale"]
        assert scale == pytest.approx(figures["baseline"][0]) and scale > 0
        assert out[f"{name}/ci_low"] * scale == pytest.approx(out[f"{name}/diff/ci_low"])
        hits["relative"].append(out[f"{name}/ci_low"] <= difference / scale <= out[f"{name}/ci_high"])
        p_values.append(out[f"{name}/diff/p"])
        _, low, high = interval(stat["baseline"], PROMPTS, draws, method="halves")
        hits["baseline"].append(low <= truth["baseline"] <= high)
        # what the bias correction is for: the plain difference and the ratio of the halves' figures
        d = figures["variant"] - figures["baseline"]
        low, high = np.quantile(d[0] + d[1:] - d[1:].mean(), [0.025, 0.975])
        hits["uncorrected diff"].append(low <= difference <= high)
        r = figures["variant"] / figures["baseline"] - 1
        low, high = np.quantile(r[0] + r[1:] - r[1:].mean(), [0.025, 0.975])
        hits["ratio of halves"].append(low <= ratio <= high)
    coverage = {k: covered(v) for k, v in hits.items()}
    for k in ("diff", "relative", "baseline"):
        assert COVERAGE[0] <= coverage[k] <= COVERAGE[1], coverage
    assert coverage["uncorrected diff"] < 0.5 and coverage["ratio of halves"] < 0.5, coverage
    assert np.mean(np.array(p_values) < 0.05) > 0.9  # the variant is far worse: p below 5% nearly always
