import pytest
import torch

from lethe.errors import LetheError
from lethe.evaluation.metrics import diversity, frechet_distance
from lethe.evaluation.featurizer import Featurizer, accuracy, train_featurizer
from lethe.memorization.features import load_features
from lethe.memorization.replication import Criteria, replication_scores, summarize

PIXELS = load_features("pixels")


@pytest.fixture(scope="module")
def train_images():
    from lethe.config import DataConfig
    from lethe.data.sources import prepare

    data = prepare(DataConfig())
    return data.tensor([r.id for r in data.split("target")])


def scores_for(images, train_images, **criteria):
    return replication_scores(PIXELS(images), PIXELS(train_images), images, train_images, Criteria(rel_l2_n=10, **criteria))


def test_exact_copy_is_a_replication_under_every_criterion(train_images):
    scores = scores_for(train_images[[0, 7, 42]], train_images)
    assert scores["sim_copied"].all() and scores["nn_ratio_copied"].all() and scores["rel_l2_copied"].all()
    assert scores["nearest"].tolist() == [0, 7, 42]
    assert torch.allclose(scores["sim"], torch.ones(3), atol=1e-5)


def test_image_far_from_training_set_is_not(train_images):
    far = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # noise, not a digit
    scores = scores_for(far, train_images)
    assert not scores["sim_copied"].any() and not scores["nn_ratio_copied"].any() and not scores["rel_l2_copied"].any()
    summary = summarize(scores)
    assert summary["rate"] == 0 and summary["sim_p95"] < 0.5


@pytest.mark.parametrize("criterion", ["sim", "nn_ratio", "rel_l2"])
def test_rate_follows_the_chosen_criterion(train_images, criterion):
    mixed = torch.cat([train_images[:3], torch.rand(1, 1, 16, 16) * 2 - 1])
    assert summarize(scores_for(mixed, train_images, criterion=criterion))["rate"] == 0.75


def test_chunked_and_unchunked_scores_agree_exactly(train_images):
    queries = train_images[:5] + 0.1 * torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = scores_for(queries, train_images, chunk_size=10_000)
    chunked = scores_for(queries, train_images, chunk_size=13)
    for key in ("nearest", "sim_nearest"):
        assert torch.equal(whole[key], chunked[key])
    for key in ("sim", "nn_ratio", "rel_l2"):  # float32 rounding: with two threads a chunk's matmul sums in
        assert torch.allclose(whole[key], chunked[key], atol=1e-5)  # another order (7e-6 seen on nn_ratio)


def test_featurizer_learns_digits_and_fd_tells_sets_apart():
    from lethe.config import DataConfig
    from lethe.data.sources import prepare

    data = prepare(DataConfig())
    pre, hold = data.split("pretrain"), data.split("holdout")
    net = train_featurizer(data.tensor([r.id for r in pre]), torch.tensor([r.label for r in pre]), 16, 300, 64, 2e-3, 0)
    held_images, held_labels = data.tensor([r.id for r in hold]), torch.tensor([r.label for r in hold])
    assert accuracy(net, held_images, held_labels) > 0.85
    same = frechet_distance(net, held_images[:100], held_images[100:])
    noise = frechet_distance(net, held_images[:100], torch.rand(100, 1, 16, 16) * 2 - 1)
    assert 0 <= same < 0.2 * noise


def test_diversity_is_zero_for_identical_generations():
    f = torch.randn(3, 8).repeat_interleave(4, dim=0)
    assert abs(diversity(f, 4)) < 1e-6
    assert diversity(torch.randn(12, 8), 4) > 0.5


def test_sscd_features_from_a_torchscript_file(tmp_path):
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())  # stands in for SSCD's network
    torch.jit.script(net).save(str(tmp_path / "sscd.pt"))
    features = load_features("sscd", str(tmp_path / "sscd.pt"))
    assert features(torch.rand(3, 1, 16, 16) * 2 - 1).shape == (3, 12)


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(LetheError, match="evaluate.features_path"):
        load_features("sscd", str(tmp_path / "nope.pt"))


def test_featurizer_reports_its_feature_size():
    assert Featurizer(1, 10, 24).num_features == 24


def test_every_evaluation_generation_has_its_own_seed():
    from lethe.evaluation.metrics import generation_plan

    prompts, seeds = generation_plan(["a one", "a two", "a three"], 4)
    assert prompts == ["a one"] * 4 + ["a two"] * 4 + ["a three"] * 4
    assert len(set(seeds)) == 12  # shared seeds made a prompt-blind model's FD 150 instead of 26
    assert generation_plan(["a one", "a two"], 4)[1] == seeds[:8]  # a prompt keeps its seeds as the group grows


def test_the_training_sets_features_are_computed_once_per_images_and_extractor(tmp_path, tiny_data, smoke_params):
    """Every evaluate, detect and calibrate stage reads the same features: the second load computes none,
    and other images or another extractor get their own file."""
    from lethe.evaluation import metrics

    cfg = smoke_params.evaluate.model_copy(update={"features": "pixels", "thresholds": "fixed"})
    first = metrics.TrainingSet.load(tiny_data, cfg, cache=tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    calls = []
    original = metrics.replication_features
    metrics.replication_features = lambda c: (lambda x: calls.append(len(x)) or original(c)(x))
    try:
        again = metrics.TrainingSet.load(tiny_data, cfg, cache=tmp_path)
        assert calls == [] and torch.equal(again.features, first.features)
        assert torch.equal(first.features, first.pixels.flatten(1).float())
        fewer = torch.zeros(3, *first.pixels.shape[1:])
        assert metrics.features_key(fewer, cfg) != file.stem[:20]
        other = cfg.model_copy(update={"features": "featurizer"})
        assert metrics.features_key(first.pixels, other) != metrics.features_key(first.pixels, cfg)
    finally:
        metrics.replication_features = original
