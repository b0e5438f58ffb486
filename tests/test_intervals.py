"""Intervals and paired comparisons on worked numbers (calibrated thresholds: tests/test_calibration.py)."""

import numpy as np
import pytest
import torch

from lethe.evaluation.intervals import interval, mean_of, paired, per_prompt, with_intervals


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


def test_a_set_statistic_is_bias_corrected_and_judged_on_its_difference():
    # a set statistic inflated by an additive c / (prompts drawn), c larger for the variant (a less diverse
    # model's FD is biased differently): on all 40 prompts the plain difference is 0.5 + 2, on a half 0.5 + 4;
    # the jackknife's correction, 2 x all - mean of halves, takes the bias out of each model and the difference
    rng = np.random.default_rng(0)
    base_values = rng.normal(10.0, 1.0, 40)
    variant_values = base_values + 0.5 + rng.normal(0.0, 0.2, 40)

    def base(rows):
        return base_values[rows].mean() + 40 / len(rows)

    def variant(rows):
        return variant_values[rows].mean() + 120 / len(rows)

    out = paired("quality/fd/holdout", variant, base, 40, 400, method="halves")
    name = "vs_baseline/quality_fd_holdout"
    truth = variant_values.mean() - base_values.mean()
    assert variant(np.arange(40)) - base(np.arange(40)) == pytest.approx(truth + 2)
    assert out[f"{name}/diff"] == pytest.approx(truth, abs=0.02)
    assert out[f"{name}/diff/ci_low"] < truth < out[f"{name}/diff/ci_high"] and out[f"{name}/diff/ci_low"] > 0
    assert out[f"{name}/significant"] == 1.0 and out[f"{name}/diff/p"] == pytest.approx(1 / 401)
    # the relative change is the corrected difference in units of the baseline's uncorrected figure
    fd, _, _ = interval(base, 40, 400, method="halves")
    assert fd == pytest.approx(base_values.mean(), abs=0.02)
    assert out[f"{name}/scale"] == pytest.approx(base_values.mean() + 1)
    assert out[name] == pytest.approx(out[f"{name}/diff"] / (base_values.mean() + 1))
    assert out[f"{name}/ci_low"] == pytest.approx(out[f"{name}/diff/ci_low"] / (base_values.mean() + 1))
    assert 0 < out[f"{name}/ci_low"] < out[name] < out[f"{name}/ci_high"]


def test_a_set_statistic_whose_corrected_baseline_is_below_zero_keeps_a_relative_change():
    # a small population FD beside its bias: the baseline is 1.0 on all prompts and 2.5 on a half, so its
    # corrected figure is 2 x 1.0 - 2.5 = -0.5; the variant's 1.5 and 3.0 correct to 0.0. The difference is
    # +0.5, and the relative change +0.5 / 1.0 (a ratio of the corrected figures would be undefined)
    def base(rows):
        return 1.0 if len(rows) == 40 else 2.5

    def variant(rows):
        return 1.5 if len(rows) == 40 else 3.0

    out = paired("quality/fd/holdout", variant, base, 40, 50, method="halves")
    name = "vs_baseline/quality_fd_holdout"
    assert interval(base, 40, 50, method="halves")[0] == pytest.approx(-0.5)
    assert out[f"{name}/diff"] == pytest.approx(0.5) and out[f"{name}/scale"] == 1.0
    assert out[name] == pytest.approx(0.5)
    assert out[f"{name}/ci_low"] == pytest.approx(0.5) and out[f"{name}/ci_high"] == pytest.approx(0.5)


def test_the_p_value_of_a_bootstrapped_difference_on_worked_cases():
    from lethe.evaluation.intervals import p_value, resamples

    # three prompts whose differences are +1, +1, -1: a draw's mean is <= 0 when two or three of its three
    # prompts are the third (7/27), never exactly 0, so p = 2 x 7/27
    diffs = np.array([1.0, 1.0, -1.0])
    out = paired("x", mean_of(diffs), mean_of(np.zeros(3)), 3, 4000)
    draws = diffs[resamples(3, 4000)].mean(1)
    assert out["vs_baseline/x/diff/p"] == pytest.approx(2 * np.mean(draws <= 0))
    assert out["vs_baseline/x/diff/p"] == pytest.approx(14 / 27, abs=0.04)
    assert p_value(np.array([-1.0, 0.0, 2.0, 3.0])) == 1.0  # 2 x min(2/4, 3/4), 0 on both sides
    assert p_value(np.array([1.0, 2.0, 3.0])) == 0.25  # no draw at or below 0: 1 / (3 + 1)
    assert p_value(np.array([-1.0] + [1.0] * 9)) == pytest.approx(0.2)
    assert np.isnan(p_value(np.array([np.nan])))
    same = paired("x", mean_of(diffs), mean_of(diffs), 3, 100)  # no difference in any draw
    assert same["vs_baseline/x/diff/p"] == 1.0 and same["vs_baseline/x/significant"] == 0.0
