"""Training-run noise in the comparisons, Holm's control, and the A/A rows, on worked numbers."""

import numpy as np
import pytest
from scipy import stats

from lethe.evaluation.runs import combine, holm, run_noise, with_run_noise

KEY, CHANGE = "replication/rate/dup", "vs_baseline/replication_rate_dup"


def test_without_run_noise_the_interval_is_the_prompts_own():
    low, high, p = combine(-0.2, -0.3, -0.1, run_sd=0.0, runs=4, n_prompts=10_000)
    assert (low, high) == pytest.approx((-0.3, -0.1), abs=1e-3) and p < 1e-4


def test_run_noise_widens_with_a_small_sample_t_quantile():
    # prompts alone: se 0.05; two runs' noise: 2 x 0.05^2 from four runs (df 3)
    low, high, p = combine(-0.2, -0.2 - 1.959964 * 0.05, -0.2 + 1.959964 * 0.05, run_sd=0.05, runs=4, n_prompts=40)
    se = np.sqrt(0.05 ** 2 + 2 * 0.05 ** 2)
    df = se ** 4 / (0.05 ** 4 / 39 + (2 * 0.05 ** 2) ** 2 / 3)
    assert high - low == pytest.approx(2 * stats.t.ppf(0.975, df) * se, rel=1e-6)
    assert p == pytest.approx(2 * stats.t.sf(0.2 / se, df), rel=1e-6)


def test_holm_steps_down_and_stops_at_the_first_failure():
    rejected = holm({"a": 0.001, "b": 0.02, "c": 0.03, "d": 0.5})
    # 0.001 <= 0.05/4; 0.02 > 0.05/3: stop, although 0.03 would pass 0.05/2 on its own
    assert rejected == {"a": True, "b": False, "c": False, "d": False}
    assert holm({"a": 0.01, "b": 0.02}) == {"a": True, "b": True}


def test_the_spread_of_the_baseline_runs_is_each_figures_run_noise():
    runs = [{KEY: v, f"{KEY}/ci_low": 0.0, "cost/train_seconds": 1.0} for v in (0.6, 0.7, 0.65, 0.55)]
    assert run_noise(runs) == {KEY: pytest.approx(np.std([0.6, 0.7, 0.65, 0.55], ddof=1))}
    assert run_noise(runs[:1]) == {}


def variant(diff, low, high, point):
    return {KEY: point, f"{CHANGE}/diff": diff, f"{CHANGE}/diff/ci_low": low, f"{CHANGE}/diff/ci_high": high,
            f"{CHANGE}/significant": float(np.sign(low)) if np.sign(low) == np.sign(high) else 0.0,
            "prompts/dup": 40.0}


def test_a_star_from_prompts_alone_is_lost_when_a_rerun_moves_as_much():
    base = {KEY: 0.6, "prompts/dup": 40.0}
    replicates = {f"baseline_seed{r}": variant(d, d - 0.08, d + 0.08, 0.6 + d) for r, d in ((1, 0.1), (2, -0.1), (3, 0.05))}
    metrics = {"baseline": base, "small": variant(-0.1, -0.17, -0.03, 0.5), "large": variant(-0.5, -0.6, -0.4, 0.1),
               **replicates}
    out = with_run_noise(metrics, "baseline", tuple(replicates))
    assert metrics["small"][f"{CHANGE}/significant"] == -1.0  # prompts alone: a star
    assert out["small"][f"{CHANGE}/significant"] == 0.0  # inside what a re-run moves
    assert out["large"][f"{CHANGE}/significant"] == -1.0 and out["large"][f"{CHANGE}/holm"] == 1.0
    assert out["small"][f"{CHANGE}/diff/prompt_ci_low"] == -0.17  # the prompt interval is kept beside
    assert all(out[r][f"{CHANGE}/significant"] == 0.0 for r in replicates)  # no A/A star
    assert out["baseline"]["runs/measured"] == 4.0
    alone = with_run_noise({"baseline": base, "small": metrics["small"]}, "baseline", ())
    assert alone["small"][f"{CHANGE}/significant"] == -1.0 and alone["small"]["runs/measured"] == 0.0



def test_a_set_statistics_relative_change_takes_its_run_noise_in_its_own_units():
    # FD's relative change is its difference over the baseline's uncorrected FD (`/scale`, 4.0 here), not over
    # the corrected figure (-1.5, below 0): the run noise 0.4 in FD becomes 0.1 on the relative scale
    fd, change = "quality/fd/holdout", "vs_baseline/quality_fd_holdout"

    def run(value, diff=None):
        m = {fd: value, "prompts/holdout": 40.0}
        if diff is not None:
            m |= {f"{change}/diff": diff, f"{change}/diff/ci_low": diff - 0.2, f"{change}/diff/ci_high": diff + 0.2,
                  change: diff / 4.0, f"{change}/ci_low": (diff - 0.2) / 4.0, f"{change}/ci_high": (diff + 0.2) / 4.0,
                  f"{change}/scale": 4.0}
        return m

    sd = 0.4
    values = -1.5 + sd * np.array([0.0, 1.0, -1.0, 0.0]) / np.std([0.0, 1.0, -1.0, 0.0], ddof=1)
    replicates = {f"baseline_seed{r}": run(values[r], values[r] + 1.5) for r in (1, 2, 3)}
    out = with_run_noise({"baseline": run(values[0]), "v": run(-1.0, 0.5), **replicates}, "baseline", tuple(replicates))
    low, high, _ = combine(0.5, 0.3, 0.7, sd, 4, 40)
    assert out["v"][f"{change}/diff/ci_low"] == pytest.approx(low)
    assert out["v"][f"{change}/ci_low"] == pytest.approx(low / 4.0) and out["v"][f"{change}/ci_high"] == pytest.approx(high / 4.0)

def test_a_rerun_is_checked_against_the_first_runs_intervals(tmp_path, capsys):
    import json

    from lethe.evaluation.rerun import main

    def write(folder, values):
        folder.mkdir()
        for variant, m in values.items():
            (folder / f"{variant}.json").write_text(json.dumps(m))

    base = {KEY: 0.6, "prompts/dup": 40.0}
    replicates = {f"baseline_seed{r}": variant(d, d - 0.05, d + 0.05, 0.6 + d) for r, d in ((1, 0.02), (2, -0.02), (3, 0.0))}
    write(tmp_path / "first", {"baseline": base, **replicates, "loyal": variant(-0.3, -0.4, -0.2, 0.3)})
    write(tmp_path / "inside", {"baseline": base, "loyal": variant(-0.25, -0.35, -0.15, 0.35)})
    write(tmp_path / "outside", {"baseline": base, "loyal": variant(0.2, 0.1, 0.3, 0.8)})
    assert main([str(tmp_path / "first"), str(tmp_path / "inside"), str(tmp_path / "outside")]) == 0
    out = capsys.readouterr().out
    assert "| loyal | dup rate (copy) | -0.300 [" in out and "| 1 | -0.250 | yes |" in out and "| 2 | +0.200 | no |" in out
    assert out.startswith(f"Written by `python -m lethe.evaluation.rerun {tmp_path / 'first'} ")
    assert "| dup rate (copy) | 1 | 2 |" in out  # per endpoint: covered, cases
    assert out.strip().endswith("Covered: 1 of 2 (50%); nominal 95%.")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "baseline.json").write_text("{")
    assert main([str(tmp_path / "first"), str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken/baseline.json: not JSON" in err
