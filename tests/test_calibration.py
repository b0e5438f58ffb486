"""Calibrated thresholds on worked numbers: exact intervals, the calibration half and the held-out half,
the generation null, and how the audit page states the null."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lethe.memorization.audit import binomial_interval
from lethe.memorization.calibration import (
    calibrate, exact_interval, flagged, generation_null, split_halves, threshold_at,
)

PUBLISHED = {"sim": 0.5, "nn_ratio": 1 / 3, "rel_l2": 0.5}


def test_exact_interval_on_worked_numbers():
    low, high = exact_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 20)) and high == pytest.approx(0.168, abs=5e-4)
    assert exact_interval(5, 100) == pytest.approx((0.0164, 0.1128), abs=5e-5)
    assert exact_interval(20, 20) == (pytest.approx(0.025 ** (1 / 20)), 1.0)
    assert exact_interval(7, 40) == pytest.approx(binomial_interval(7, 40))  # scipy's binomtest, the same interval
    assert all(np.isnan(exact_interval(0, 0)))


def test_the_halves_are_a_fixed_random_split_of_every_image():
    calibration, heldout = split_halves(21)
    assert len(calibration) == 11 and len(heldout) == 10
    assert sorted(torch.cat([calibration, heldout]).tolist()) == list(range(21))
    assert torch.equal(split_halves(21)[0], calibration)  # the same split every run
    assert not torch.equal(split_halves(21, seed=1)[0], calibration)
    assert calibration.tolist() != list(range(11))  # random, not the first images


def test_a_threshold_flags_floor_fpr_n_of_the_scores_it_is_read_from():
    # ten scores, 20% -> the two smallest are below the threshold (the third smallest)
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4, 1.0])
    assert threshold_at(scores, 0.2, below=True) == pytest.approx(0.3)
    assert flagged(scores, 0.3, below=True).sum() == 2
    assert threshold_at(scores, 0.2, below=False) == pytest.approx(0.8) and flagged(scores, 0.8, below=False).sum() == 2


def halves_that_differ(n: int = 20) -> dict[str, torch.Tensor]:
    """Calibration half: rel_l2 and nn_ratio 0.1, 0.2, ..., 1.0; held-out half: 0.05, 0.15, ..., 0.95.
    sim = 1 - rel_l2 (a copy is above it)."""
    calibration, heldout = split_halves(n)
    rel = torch.empty(n, dtype=torch.float64)
    rel[calibration] = torch.arange(1, 11, dtype=torch.float64) / 10
    rel[heldout] = torch.arange(1, 11, dtype=torch.float64) / 10 - 0.05
    return {"rel_l2": rel, "nn_ratio": rel.clone(), "sim": 1 - rel}


def test_the_held_out_rate_is_measured_not_fixed_by_construction():
    scores = halves_that_differ()
    c = calibrate(scores, 0.2, PUBLISHED)
    assert c["calibration/holdout_images"] == 20
    assert c["calibration/calibration_images"] == 10 and c["calibration/heldout_images"] == 10
    # calibration half: k = floor(0.2 x 10) = 2 -> the third smallest, 0.3 (the third largest sim, 0.7)
    assert c["calibration/rel_l2/threshold"] == pytest.approx(0.3)
    assert c["calibration/nn_ratio/threshold"] == pytest.approx(0.3)
    assert c["calibration/sim/threshold"] == pytest.approx(0.7)
    calibration, _ = split_halves(20)
    assert flagged(scores["rel_l2"][calibration], 0.3, below=True).double().mean() == 0.2  # floor(fpr n) / n there
    # held-out half: 0.05, 0.15 and 0.25 are below 0.3 (0.95, 0.85, 0.75 above 0.7): 3 of 10, not 2
    for name in ("rel_l2", "nn_ratio", "sim"):
        assert c[f"calibration/{name}/heldout_fpr"] == pytest.approx(0.3)
        assert (c[f"calibration/{name}/heldout_fpr/ci_low"], c[f"calibration/{name}/heldout_fpr/ci_high"]) == \
            pytest.approx(exact_interval(3, 10))
    # the published thresholds on all 20 images: rel_l2 < 0.5 -> 0.1..0.4 and 0.05..0.45 = 9; nn_ratio < 1/3 -> 6
    assert c["calibration/rel_l2/published_holdout_fpr"] == pytest.approx(9 / 20)
    assert c["calibration/nn_ratio/published_holdout_fpr"] == pytest.approx(6 / 20)
    assert c["calibration/sim/published_holdout_fpr"] == pytest.approx(9 / 20)  # sim > 0.5
    assert c["calibration/rel_l2/published_holdout_fpr/ci_high"] == pytest.approx(exact_interval(9, 20)[1])
    assert "calibration/rel_l2/holdout_fpr" not in c  # the same-images rate, floor(fpr n) / n, is gone


def test_too_few_holdout_images_to_split_is_an_error():
    from lethe.errors import LetheError

    with pytest.raises(LetheError, match="at least 2"):
        calibrate({k: torch.tensor([0.5]) for k in ("rel_l2", "nn_ratio", "sim")}, 0.05, PUBLISHED)


def test_the_generation_null_rate_at_the_calibrated_thresholds():
    calibrated = {"calibration/rel_l2/threshold": 0.3, "calibration/nn_ratio/threshold": 0.25,
                  "calibration/sim/threshold": 0.8}
    rel = torch.tensor([0.1, 0.29, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])  # 2 strictly below 0.3 (0.3 itself is not)
    sim = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    null = generation_null({"rel_l2": rel, "nn_ratio": rel, "sim": sim}, calibrated)
    key = "calibration/rel_l2/generation_null_rate"
    assert null["calibration/generation_null_images"] == 8 and null[key] == 0.25
    assert (null[f"{key}/ci_low"], null[f"{key}/ci_high"]) == pytest.approx(exact_interval(2, 8))
    assert null["calibration/nn_ratio/generation_null_rate"] == 0.125  # only 0.1 is below 0.25
    assert null["calibration/sim/generation_null_rate"] == 0.125  # 0.9 above 0.8; 0.8 itself is not
    assert null["calibration/sim/generation_null_rate/ci_low"] == pytest.approx(exact_interval(1, 8)[0])


def test_the_stage_generates_the_null_with_the_pretrained_model_for_the_target_captions(monkeypatch):
    import lethe.stages.calibrate as stage

    made = {}

    def generate(model, scheduler, prompts, seeds, sample, label=None):
        made.update(model=model, prompts=prompts, seeds=seeds)
        return torch.zeros(len(prompts), 1, 4, 4)

    monkeypatch.setattr(stage, "load_model", lambda path: SimpleNamespace(path=path, to=lambda device: None))
    monkeypatch.setattr(stage, "build_scheduler", lambda model, cfg: None)
    monkeypatch.setattr(stage, "generate", generate)
    records = [SimpleNamespace(caption=f"target {i}") for i in range(5)]
    data = SimpleNamespace(pictures=lambda split: records if split == "target" else [])
    params = SimpleNamespace(evaluate=SimpleNamespace(prompts_per_group=3, generations_per_prompt=2),
                             diffusion=None, sample=None)
    images = stage.null_generations(params, data)
    assert len(images) == 6 and str(made["model"].path) == "models/pretrained"
    assert made["prompts"] == ["target 0", "target 0", "target 1", "target 1", "target 2", "target 2"]
    assert made["seeds"] == list(range(6))  # generation_plan's: what evaluate gives the same captions


def audit_summary(variant, null):
    metrics = {"audit/reproduced": 1.0, "audit/images": 10.0, "audit/reproduced_share": 0.1,
               "audit/reproduced_share/ci_low": 0.0, "audit/reproduced_share/ci_high": 0.4, "audit/prompts": 10.0,
               "audit/generations": 40.0, "audit/threshold": 0.3, "audit/threshold_calibrated": 1.0,
               "audit/holdout_images": 40.0, "audit/generation_rate": 0.0125}
    return {"mode": "full", "fpr": 0.05, "metrics": metrics, "variant": variant, "generation_null": null}


def test_the_audit_page_states_the_generation_null_beside_its_guarantee(tmp_path, monkeypatch):
    from lethe.evaluation.audit_page import summary_lines
    from lethe.stages.audit import generation_null as audit_null

    monkeypatch.chdir(tmp_path)
    assert audit_null("baseline") is None  # no metrics/calibration.json yet
    (tmp_path / "metrics").mkdir()
    c = calibrate(halves_that_differ(), 0.2, PUBLISHED)
    c |= generation_null({"rel_l2": torch.tensor([0.1, 0.2] + [0.9] * 14), "nn_ratio": torch.ones(16),
                          "sim": torch.zeros(16)}, c)
    (tmp_path / "metrics/calibration.json").write_text(json.dumps(c))
    null = audit_null("baseline")
    assert null["rate"] == 0.125 and null["images"] == 16 and null["threshold"] == pytest.approx(0.3)
    assert audit_null(None) is None  # a model a user brought: its own --holdout, no null
    page = " ".join(summary_lines(audit_summary("baseline", null)))
    low, high = exact_interval(2, 16)
    assert f"flags 12.5% [{low:.1%}, {high:.1%}]" in page and "made 16 images" in page
    assert "expected share of at most 5%" in page  # the guarantee, still there
    assert "Generation null: not measured for this model" in " ".join(summary_lines(audit_summary(None, None)))
    assert "run <code>dvc repro calibrate</code>" in " ".join(summary_lines(audit_summary("baseline", None)))
