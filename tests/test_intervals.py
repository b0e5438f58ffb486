"""Intervals, paired comparisons and calibrated thresholds on worked numbers."""

import numpy as np
import pytest
import torch

from lethe.evaluation.intervals import interval, mean_of, paired, per_prompt, with_intervals
from lethe.memorization.calibration import calibrate, flagged, threshold_at


def test_a_constant_has_no_width_and_a_coin_has_the_textbook_width():
    assert interval(mean_of(np.ones(40)), 40, 500) == (1.0, 1.0, 1.0)
    coin = np.array([0.0, 1.0] * 20)  # 40 prompts, half replicate: sd of the mean = 0.5 / sqrt(40) = 0.079
    point, low, high = interval(mean_of(coin), 40, 2000)
    assert point == 0.5 and high - low == pytest.approx(2 * 1.96 * 0.079, abs=0.04)


def test_generations_of_a_prompt_are_resampled_together():
    # 10 prompts x 4 generations; a prompt replicates all or nothing. Treated as 40 independent generations the
    # interval would be half as wide; per prompt it is the interval of 10 coin flips.
    flags = np.repeat([1.0, 0.0] * 5, 4)
    point, low, high = interval(mean_of(per_prompt(flags, 4)), 10, 2000)
    assert point == 0.5 and high - low > 0.5


def test_a_paired_difference_is_significant_where_the_models_differ_on_the_same_prompts():
    rng = np.random.default_rng(0)
    hard = rng.random(40)  # how memorized each prompt is: shared by both models
    baseline = (hard > 0.3).astype(float)
    variant = (hard > 0.5).astype(float)  # copies fewer, on the same prompts: 0.70 -> 0.52 here
    out = paired("replication/rate/dup", mean_of(variant), mean_of(baseline), 40, 1000)
    assert out["vs_baseline/replication_rate_dup/diff"] == pytest.approx(variant.mean() - baseline.mean())
    assert out["vs_baseline/replication_rate_dup/diff/ci_high"] < 0
    assert out["vs_baseline/replication_rate_dup/significant"] == -1.0
    # two separate intervals overlap, which would wrongly call it noise
    assert interval(mean_of(variant), 40, 1000)[2] > interval(mean_of(baseline), 40, 1000)[1]


def test_a_difference_inside_the_noise_is_not_significant():
    baseline = np.array([1.0, 0.0] * 20)
    variant = np.roll(baseline, 1)  # the same rate, on other prompts
    variant[1] = 0.0  # one prompt fewer: 0.475 vs 0.5
    out = paired("replication/rate/dup", mean_of(variant), mean_of(baseline), 40, 1000)
    assert out["vs_baseline/replication_rate_dup/diff/ci_low"] < 0 < out["vs_baseline/replication_rate_dup/diff/ci_high"]
    assert out["vs_baseline/replication_rate_dup/significant"] == 0.0
    assert out["vs_baseline/replication_rate_dup"] == pytest.approx(-0.05)


def test_draws_with_one_class_only_are_left_out():
    truth = np.array([True] + [False] * 9)
    out = with_intervals(lambda rows: {"auc": 1.0 if truth[rows].any() and not truth[rows].all() else float("nan")}, 10, 200)
    assert out["auc"] == 1.0 and out["auc/ci_low"] == 1.0


def test_a_calibrated_threshold_flags_its_target_share_of_the_holdout_images():
    rng = np.random.default_rng(1)
    holdout = {"rel_l2": torch.from_numpy(rng.random(200)), "nn_ratio": torch.from_numpy(rng.random(200)),
               "sim": torch.from_numpy(rng.random(200))}
    c = calibrate(holdout, 0.05, {"sim": 0.5, "nn_ratio": 1 / 3, "rel_l2": 0.5})
    for name in ("sim", "nn_ratio", "rel_l2"):
        assert c[f"calibration/{name}/holdout_fpr"] == 0.05  # exactly 10 of 200
    assert c["calibration/nn_ratio/published_holdout_fpr"] == pytest.approx((holdout["nn_ratio"] < 1 / 3).double().mean().item())
    # worked: ten scores, 20% -> the two smallest are below the threshold (the third smallest)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4, 1.0])
    assert threshold_at(scores, 0.2, below=True) == pytest.approx(0.3)
    assert flagged(scores, 0.3, below=True).sum() == 2
    assert threshold_at(scores, 0.2, below=False) == pytest.approx(0.8) and flagged(scores, 0.8, below=False).sum() == 2


def test_fd_intervals_by_halves_hold_the_point_and_the_bootstrap_would_not():
    from lethe.evaluation.figures import statistics
    from lethe.evaluation.metrics import FeatureDistances

    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(200, 4)))
    fake = rng.normal(size=(80, 4)) + 0.3  # 40 prompts x 2 generations, shifted
    outcomes = {"features": fake, "sim": np.zeros(80), "diversity": np.zeros(40),
                **{flag: np.zeros(80, bool) for flag in ("copied", "sim_copied", "nn_ratio_copied", "rel_l2_copied", "gu_copied")}}
    fd = statistics(outcomes, 2, FeatureDistances(real))["quality/fd"]
    point, low, high = interval(fd, 40, 200, method="halves")
    assert low < point < high
    _, boot_low, _ = interval(fd, 40, 200)  # duplicated generations inflate FD: the point falls out below
    assert boot_low > low


def test_kid_is_torchmetrics_unbiased_mmd_on_the_same_subsets():
    from torchmetrics.image.kid import poly_mmd

    from lethe.evaluation.metrics import FeatureDistances

    rng = np.random.default_rng(0)
    real, fake = torch.from_numpy(rng.normal(size=(50, 6))), torch.from_numpy(rng.normal(size=(20, 6)) + 0.5)
    distances = FeatureDistances(real, kid_subsets=7)
    subsets, _ = distances._subsets(20)
    expected = torch.stack([poly_mmd(real[rows], fake) for rows in subsets]).mean().item()
    assert distances.kernel(fake) == pytest.approx(expected, rel=1e-9)
    same = torch.from_numpy(rng.normal(size=(20, 6)))
    assert distances.kernel(fake) > 0 and distances.kernel(fake) > distances.kernel(same)  # shifted: farther


def test_a_set_statistic_is_judged_on_the_interval_of_its_relative_change():
    # FD on a half of the prompts is inflated by a factor that depends on the half, for both models alike:
    # the difference swings with it and its centred interval reaches 0; the ratio stays at +50%
    def base_fd(rows):
        return 10.0 * (1 + 4 * ((rows * 7919).sum() % 101) / 100) * (2 if len(rows) < 40 else 1)

    out = paired("quality/fd/holdout", lambda rows: 1.5 * base_fd(rows), base_fd, 40, 200, method="halves")
    assert out["vs_baseline/quality_fd_holdout/diff/ci_low"] < 0 < out["vs_baseline/quality_fd_holdout/ci_low"]
    assert out["vs_baseline/quality_fd_holdout"] == pytest.approx(0.5)
    assert out["vs_baseline/quality_fd_holdout/significant"] == 1.0
