"""Re-identification (is a generation's nearest target or holdout picture its prompt's own?) and the own
relative L2 (distance to the own picture over rel_l2's scale), per generation and as paired figures."""

import math

import numpy as np
import pytest
import torch

from lethe.config import EvaluateConfig
from lethe.data.prepared import PreparedData, Record
from lethe.errors import LetheError
from lethe.evaluation.figures import group_figures, paired_figures, statistics
from lethe.evaluation.metrics import Pictures, TrainingSet
from lethe.memorization.features import load_features
from lethe.memorization.replication import Criteria

PIXELS = load_features("pixels")


def prepared() -> PreparedData:
    """6 pretrain, 4 target (id 7 a copy of id 6: one picture) and 3 holdout images, random 1 x 8 x 8."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(13, 1, 8, 8), dtype=np.uint8)
    images[7] = images[6]
    splits = ["pretrain"] * 6 + ["target"] * 4 + ["holdout"] * 3
    groups = list(range(13))
    groups[7] = 6
    records = [Record(id=i, split=s, caption=f"picture {i}", dup_count=2 if i in (6, 7) else 1, label=None,
                      source="test", group=g) for i, (s, g) in enumerate(zip(splits, groups))]
    return PreparedData(images=images, records=records)


@pytest.fixture
def setup(tmp_path):
    data = prepared()
    cfg = EvaluateConfig(features="pixels", thresholds="fixed", rel_l2_n=3)
    train = data.tensor([r.id for r in data.records if r.split in ("pretrain", "target")])
    training = TrainingSet(train, PIXELS(train), PIXELS, Criteria(rel_l2_n=3))
    return data, training, Pictures.load(data, training, cfg, cache=tmp_path)


def test_pictures_are_one_per_target_and_holdout_picture(setup, tmp_path):
    data, training, pictures = setup
    assert pictures.ids == [6, 8, 9, 10, 11, 12]  # the copy (7) and the pretraining images are not candidates
    assert torch.equal(pictures.features, PIXELS(data.tensor(pictures.ids)))
    assert len(list(tmp_path.iterdir())) == 1  # cached like the training set's features
    with pytest.raises(LetheError, match="not target or holdout pictures"):
        pictures.rows([0])


def test_generation_identical_to_its_own_picture_is_reidentified(setup):
    data, training, pictures = setup
    scores = training.replication(data.tensor([6, 9]), [6, 9], pictures)
    assert scores["reidentified"].tolist() == [True, True]
    assert scores["own_rel_l2"].tolist() == [0.0, 0.0]
    assert torch.allclose(scores["own_rel_l2"], scores["rel_l2"])  # its own is its nearest: the same figure


def test_generation_identical_to_another_target_picture_is_not(setup):
    data, training, pictures = setup
    scores = training.replication(data.tensor([9, 6]), [6, 9], pictures)  # each the other's picture
    assert scores["reidentified"].tolist() == [False, False]
    assert scores["rel_l2_copied"].all()  # a copy, but of another picture than its prompt's
    assert (scores["own_rel_l2"] > 0.5).all()


def test_holdout_prompt_equal_to_its_holdout_picture_counts(setup):
    """Chance-level definition: the own picture of a holdout prompt is the holdout picture, never trained on."""
    data, training, pictures = setup
    scores = training.replication(data.tensor([11]), [11], pictures)
    assert scores["reidentified"].tolist() == [True]
    assert scores["own_rel_l2"].item() == 0.0
    assert scores["nearest_distance"].item() > 0  # not in the training set: rel_l2 sees no copy of it


def test_own_rel_l2_per_prompt_min_on_a_worked_case():
    """Training images (0,0), (10,0), (0,10); n = 2 nearest. Prompt A owns (0,0), prompt B owns (10,0)."""
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).view(3, 1, 1, 2)
    training = TrainingSet(train, PIXELS(train), PIXELS, Criteria(rel_l2_n=2))
    pictures = Pictures(ids=[0, 1], pixels=train[:2], features=PIXELS(train[:2]))
    gens = torch.tensor([[3.0, 4.0], [0.0, 1.0], [10.0, 2.0], [6.0, 0.0]]).view(4, 1, 1, 2)
    scores = training.replication(gens, [0, 0, 1, 1], pictures)
    expected = [5 / ((5 + math.sqrt(45)) / 2),  # A: own 5; nearest 5 and 6.708
                1 / ((1 + 9) / 2),  # A: own 1; nearest 1 and 9 -> 0.2, A's min
                2 / ((2 + math.sqrt(104)) / 2),  # B: own 2; nearest 2 and 10.198 -> 0.328, B's min
                4 / ((4 + 6) / 2)]  # B: own 4 (the nearest is (10,0) too); nearest 4 and 6 -> 0.8
    assert scores["own_rel_l2"].tolist() == pytest.approx(expected, rel=1e-6)

    outcomes = {"own_rel_l2": scores["own_rel_l2"].numpy(), "sim": np.zeros(4), "diversity": np.zeros(2),
                **{flag: np.zeros(4, bool) for flag in ("copied", "sim_copied", "nn_ratio_copied", "rel_l2_copied",
                                                       "gu_copied", "reidentified")}}
    stat = statistics(outcomes, 2, None)["replication/own_rel_l2"]
    assert stat(np.array([0, 1])) == pytest.approx((0.2 + 4 / (2 + math.sqrt(104))) / 2, rel=1e-6)  # ~0.264, not the mean
    assert stat(np.array([0, 0])) == pytest.approx(0.2, rel=1e-6)
    figures = group_figures("dup", {"replication/own_rel_l2": stat}, 2, 200)
    assert figures["replication/own_rel_l2/dup/ci_low"] == pytest.approx(0.2, rel=1e-6)
    assert figures["replication/own_rel_l2/dup/ci_high"] == pytest.approx(4 / (2 + math.sqrt(104)), rel=1e-6)


def outcomes_with(reidentified, own_rel_l2, k=2):
    n = len(reidentified)
    return {"prompts": np.repeat([f"p{i // k}" for i in range(0, n, k)], k), "features": np.zeros((n, 2)),
            "sim": np.zeros(n), "diversity": np.zeros(n // k), "own_rel_l2": np.asarray(own_rel_l2, float),
            "reidentified": np.asarray(reidentified, bool),
            **{flag: np.zeros(n, bool) for flag in ("copied", "sim_copied", "nn_ratio_copied", "rel_l2_copied", "gu_copied")}}


def test_paired_reidentification_and_own_rel_l2_figures():
    k, n_prompts = 2, 20
    baseline = outcomes_with([True, True] * 10 + [False, False] * 10, [0.1] * 40)  # half the prompts re-identified
    variant = outcomes_with([False] * 40, [0.6] * 40)  # none, and farther from their own pictures
    stats, base = statistics(variant, k, None), statistics(baseline, k, None)
    figures = group_figures("dup", stats, n_prompts, 200)
    assert figures["replication/reid_rate/dup"] == 0.0
    out = paired_figures("dup", stats, base, n_prompts, 200)
    assert out["vs_baseline/replication_reid_rate_dup/diff"] == pytest.approx(-0.5)
    assert out["vs_baseline/replication_reid_rate_dup/significant"] == -1.0
    assert out["vs_baseline/replication_own_rel_l2_dup/diff"] == pytest.approx(0.5)
    assert out["vs_baseline/replication_own_rel_l2_dup/significant"] == 1.0
    assert "vs_baseline/replication_rate_dup/diff" in out


def test_old_baseline_outcomes_ask_for_a_rerun_not_a_key_error(tmp_path):
    from lethe.files import load_outcomes, save_outcomes
    from lethe.stages.evaluate import paired_with

    ours = outcomes_with([False] * 4, [0.5] * 4)
    old = {name: value for name, value in ours.items() if name not in ("reidentified", "own_rel_l2")}
    save_outcomes(tmp_path / "baseline.npz", {"dup": old})
    with pytest.raises(LetheError, match=r"no reidentified, own_rel_l2\); run `dvc repro evaluate@baseline`") as error:
        paired_with(load_outcomes(tmp_path / "baseline.npz"), "dup", ours)
    assert "\n" not in str(error.value)
    save_outcomes(tmp_path / "baseline.npz", {"dup": ours})
    assert paired_with(load_outcomes(tmp_path / "baseline.npz"), "dup", ours)["reidentified"].tolist() == [False] * 4
