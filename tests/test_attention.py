"""Cross-attention capture and control, MemAttn's mitigation, NeMo's deactivation and localization rules."""

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from lethe.localization.nemo import (deactivate, first_passing, initial_candidates, kept_seeds, refine, same_seed_score,
                                     theta_schedule, value_layers)
from lethe.memorization.attention import attention_control, cross_attention_layers, entropy
from lethe.memorization.detectors import (detection_quality, memattn_scores, pairwise_similarities, seed_max_similarity,
                                          similarity)
from lethe.inference.memattn import through_first_end


def test_entropy_of_a_uniform_distribution_is_ln_n():
    for n in (2, 24, 77):
        assert entropy(torch.full((n,), 1.0 / n)).item() == pytest.approx(math.log(n), rel=1e-6)
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def _unet_output(model, x, t, states):
    return model.unet(x, t, encoder_hidden_states=states).sample


def test_processors_leave_the_output_unchanged_until_asked(tiny_model):
    x, states = torch.randn(3, 1, 16, 16), torch.randn(3, 24, tiny_model.text_encoder.dim)
    before = _unet_output(tiny_model, x, 500, states)
    control = attention_control(tiny_model)
    assert len(control.layers) == len(cross_attention_layers(tiny_model.unet)) >= 3
    assert torch.allclose(_unet_output(tiny_model, x, 500, states), before, atol=1e-5)
    with control.capturing():
        captured = _unet_output(tiny_model, x, 500, states)
        maps = dict(control.captured)
    assert torch.allclose(captured, before, atol=1e-5)  # the explicit path computes the same attention
    assert set(maps) == set(control.layers)
    for a in maps.values():
        assert a.shape == (3, 24) and torch.allclose(a.sum(1), torch.ones(3), atol=1e-5)


def _one_query_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=1, dim_head=8)
    model = torch.nn.Module()
    model.unet = torch.nn.Module()
    model.unet.attn2 = attn
    control = attention_control(model)
    return attn, control


def test_masking_and_logit_scaling_change_exactly_the_intended_positions():
    attn, control = _one_query_attention()
    hidden, context = torch.randn(2, 1, 8), torch.randn(2, 5, 6)  # row 0 unconditional, row 1 conditional
    logits = (attn.to_q(hidden) @ attn.to_k(context).transpose(1, 2)).squeeze(1) * attn.scale  # 2 x 5
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with control.capturing(), control.steer(torch.tensor([False, True]), keep, begin_scale=1.25):
        steered = attn(hidden, context)
        probs = control.captured[control.layers[0]]
    expected_cond = logits[1].clone()
    expected_cond[0] *= 1.25
    expected_cond[3:] = float("-inf")
    assert torch.allclose(probs[1], expected_cond.softmax(-1), atol=1e-6)
    assert torch.allclose(probs[0], logits[0].softmax(-1), atol=1e-6)  # the unconditional row is untouched
    assert probs[1, 3:].eq(0).all()
    plain = attn(hidden, context)
    assert torch.allclose(steered[0], plain[0], atol=1e-6) and not torch.allclose(steered[1], plain[1])


def test_padding_mask_keeps_through_the_first_end_token():
    ids = torch.tensor([[7, 3, 9, 9, 0], [7, 9, 0, 0, 0], [7, 1, 2, 3, 4]])
    assert through_first_end(ids, 9).tolist() == [
        [True, True, True, False, False], [True, True, False, False, False], [True] * 5]


def test_zeroing_channels_through_the_hook_equals_zeroing_rows_of_w_v(tiny_model):
    neurons = {(name, c) for name in value_layers(tiny_model.unet) for c in (0, 3, 5)}
    x, states = torch.randn(2, 1, 16, 16), torch.randn(2, 24, tiny_model.text_encoder.dim)
    control = attention_control(tiny_model)
    masks = {}
    for name, layer in value_layers(tiny_model.unet).items():
        masks[name] = torch.ones(2, layer.to_v.out_features)
        masks[name][:, [0, 3, 5]] = 0.0
    with control.masking_values(masks):
        hooked = _unet_output(tiny_model, x, 900, states)
    pruned = copy.deepcopy(tiny_model)
    deactivate(pruned, neurons)
    assert torch.allclose(hooked, _unet_output(pruned, x, 900, states), atol=1e-5)
    assert not torch.allclose(hooked, _unet_output(tiny_model, x, 900, states), atol=1e-4)
    layer = next(iter(value_layers(pruned.unet).values()))
    assert layer.to_v.weight[[0, 3, 5]].abs().sum() == 0 and layer.to_v.weight[1].abs().sum() > 0


def test_value_masks_apply_per_row(tiny_model):
    """Row 0 intact, row 1 blocked: one forward pass scores two candidate sets."""
    control = attention_control(tiny_model)
    x, states = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1), torch.randn(1, 24, tiny_model.text_encoder.dim).repeat(2, 1, 1)
    masks = {name: torch.stack([torch.ones(l.to_v.out_features), torch.zeros(l.to_v.out_features)])
             for name, l in value_layers(tiny_model.unet).items()}
    with control.masking_values(masks):
        out = _unet_output(tiny_model, x, 900, states)
    assert torch.allclose(out[0], _unet_output(tiny_model, x[:1], 900, states[:1])[0], atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_seed_similarity_is_one_for_identical_noise_differences():
    same = torch.rand(1, 1, 1, 16, 16).expand(1, 4, 1, 16, 16)
    different = torch.rand(1, 4, 1, 16, 16)
    assert pairwise_similarities(same).min().item() == pytest.approx(1.0, abs=1e-4)
    assert pairwise_similarities(different).max().item() < 0.5


def test_each_seeds_best_match_on_worked_numbers():
    pairwise = torch.tensor([[0.2, 0.7, 0.4]])  # seed pairs (0, 1), (0, 2), (1, 2)
    assert seed_max_similarity(pairwise, 3).tolist() == [[pytest.approx(0.7), pytest.approx(0.4), pytest.approx(0.7)]]


def test_similarity_is_ms_ssim_at_sd_latent_size_and_ssim_below():
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                               structural_similarity_index_measure)
    torch.manual_seed(0)
    a = torch.rand(2, 4, 64, 64)
    b = (a + 0.3 * torch.rand(2, 4, 64, 64)).clamp(0, 1)
    ms = multiscale_structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=11, betas=(0.33, 0.33, 0.33),
                                                        reduction="none")
    assert torch.allclose(similarity(a, b), ms)
    small = a[..., :16, :16], b[..., :16, :16]
    assert torch.allclose(similarity(*small), structural_similarity_index_measure(*small, data_range=1.0, kernel_size=11,
                                                                                  reduction="none"))


def test_nemo_keeps_seeds_that_repeat_and_scores_blocked_against_the_same_seed():
    """NeMo's score pairs a seed's blocked noise difference with its own intact one. Scoring across seeds
    (the old i != j) would call a candidate that swaps two repeating seeds' outputs still memorized."""
    torch.manual_seed(0)
    shared, other = torch.rand(1, 16, 16), torch.rand(1, 16, 16)
    intact = torch.stack([shared, shared + 0.02 * torch.rand(1, 16, 16), other])  # seeds 0 and 1 repeat, 2 does not
    kept = kept_seeds(intact, tau=0.9)
    assert kept.tolist() == [0, 1]
    fresh = torch.rand(2, 1, 16, 16)
    blocked = torch.stack([intact[kept],                        # nothing changed: still memorized
                           torch.stack([fresh[0], intact[1]]),  # seed 1 untouched: the max keeps it memorized
                           fresh])                              # both seeds changed
    scores = same_seed_score(intact[kept], blocked)
    assert scores[0].item() == pytest.approx(1.0, abs=1e-4) and scores[1].item() == pytest.approx(1.0, abs=1e-4)
    expected = max(similarity(fresh[i : i + 1], intact[i : i + 1]).item() for i in (0, 1))
    assert scores[2].item() == pytest.approx(expected, abs=1e-6) and expected < 0.5


def test_memattn_d_averages_layers_first_and_keeps_the_sign():
    """Tokens [begin, word, end, padding], 5 steps (the last fifth is step 4), two layers. Averaged over
    layers: step 0 is [.25, .15, .3, .3], step 4 [.4, .4, .1, .1]. D = H(step 4) + H_summary(step 4) −
    H_summary(step 0) = 1.193550 + (0.460517 − 0.722384) = 0.931683; per-layer entropies with an absolute
    shift gave 1.168335."""
    steps = torch.full((5, 4), 0.25)
    layer_a, layer_b = steps.clone(), steps.clone()
    layer_a[0], layer_b[0] = torch.tensor([0.4, 0.2, 0.2, 0.2]), torch.tensor([0.1, 0.1, 0.4, 0.4])
    layer_a[4], layer_b[4] = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.7, 0.1, 0.1])
    ids = torch.tensor([[49406, 320, 49407, 49407]])
    scores = memattn_scores({"a": layer_a[None], "b": layer_b[None]}, ids, end_id=49407, layer=0)
    assert scores["memattn_d"].item() == pytest.approx(0.931683, abs=1e-5)
    assert scores["memattn_e"].item() == pytest.approx(1.332179, abs=1e-5)  # layer a's entropy at step 0


def test_memattn_reference_layer_is_the_fourth_cross_attention_of_sd():
    """The stable-diffusion preset's detect.memattn_layer (3) names down_blocks.1.attentions.1, MemAttn's layer."""
    from diffusers import UNet2DConditionModel

    from lethe.config import load_params

    unet = UNet2DConditionModel(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, sample_size=8)  # SD 1.x's block layout, tiny widths
    layer = load_params("pipelines/stable-diffusion/params.yaml").detect.memattn_layer
    assert list(cross_attention_layers(unet))[layer].startswith("down_blocks.1.attentions.1.")


def test_detection_quality_on_separable_and_inseparable_scores():
    perfect = detection_quality([0.9, 0.8, 0.1, 0.2, 0.3], [True, True, False, False, False])
    assert perfect == {"auroc": 1.0, "tpr_at_1pct_fpr": 1.0}
    reversed_ = detection_quality([0.1, 0.2, 0.9, 0.8, 0.7], [True, True, False, False, False])
    assert reversed_["auroc"] == 0.0 and reversed_["tpr_at_1pct_fpr"] == 0.0
    assert math.isnan(detection_quality([0.1, 0.2], [True, True])["auroc"])


# NeMo's search rules, on a synthetic score: memorization is gone once neurons A, B and C are all off.
NEEDED = {("l0", 1), ("l0", 2), ("l1", 0)}


def synthetic_score(calls):
    def score(candidates):
        calls.append(len(candidates))
        return [0.2 if NEEDED <= set(c) else 0.9 - 0.01 * len(NEEDED & set(c)) for c in candidates]
    return score


def test_theta_schedule_runs_from_5_to_1_25():
    schedule = theta_schedule(iterations=100)
    assert len(schedule) == 16 and schedule[0] == (5.0, 0) and schedule[-1] == (1.25, 15)
    assert theta_schedule(iterations=3) == [(5.0, 0), (4.75, 1), (4.5, 2)]


def test_initial_selection_takes_z_above_theta_and_the_most_active_neurons():
    z = {"l0": torch.tensor([0.0, 6.0, 2.0, -5.5]), "l1": torch.tensor([1.5, 0.1, 0.2])}
    raw = {"l0": torch.tensor([3.0, 1.0, 0.5, 0.2]), "l1": torch.tensor([0.1, 0.9, 0.3])}  # activity, not |z|
    candidates = initial_candidates(z, raw, iterations=3)
    assert candidates[0] == {("l0", 1), ("l0", 3)}  # |z| > 5, k = 0
    assert candidates[1] == {("l0", 1), ("l0", 3), ("l0", 0), ("l1", 1)}  # theta 4.75, the most active of each layer
    assert candidates[2] == {("l0", 1), ("l0", 3), ("l0", 0), ("l1", 1), ("l1", 2)}  # top-2: l0's 1 already in


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_refinement_returns_the_needed_set_below_tau_for_any_batch_size(batch_size):
    calls = []
    score = synthetic_score(calls)
    start = frozenset({("l0", 0), ("l0", 1), ("l0", 2), ("l0", 3), ("l1", 0), ("l1", 1), ("l2", 4)})
    found = refine(start, ["l0", "l1", "l2"], score, tau=0.5, batch_size=batch_size)
    assert found == NEEDED
    assert score([found])[0] < 0.5  # refinement never returns a set above tau_mem
    if batch_size == 64:
        assert len(calls) < 9  # fewer forward passes than one per candidate


def test_first_passing_finds_the_first_below_tau():
    calls = []
    sets = [frozenset(), frozenset({("l0", 1)}), frozenset(NEEDED), frozenset(NEEDED | {("l2", 0)})]
    assert first_passing(sets, synthetic_score(calls), 0.5, batch_size=2) == (2, 0.2)
    assert first_passing(sets[:2], synthetic_score(calls), 0.5, batch_size=2) is None
    assert first_passing(sets, synthetic_score(calls), 0.2, batch_size=2) is None  # strictly below, in refinement
    assert first_passing(sets, synthetic_score(calls), 0.2, batch_size=2, inclusive=True) == (2, 0.2)  # at most, initially


def test_nemo_with_every_neuron_blocked_scores_below_the_intact_model(tiny_model):
    """localize's `score_all_blocked`: NeMo's whole search space off at once moves the noise difference away
    from the intact one; nothing blocked scores 1."""
    from lethe.localization import nemo
    from lethe.sampling import nemo_step

    t, noise = nemo_step(tiny_model, __import__("diffusers").DDPMScheduler(), 3)
    states = tiny_model.encode_text(tiny_model.text_encoder.tokenize(["a handwritten 3"])).detach()
    score = nemo.MemorizationScore(tiny_model, t, noise, states, tau=-1.0)  # tau -1: every seed kept
    every = frozenset((layer, c) for layer, channels in score.channels.items() for c in range(channels))
    intact, blocked = score([frozenset(), every])
    assert intact == pytest.approx(1.0, abs=1e-4) and blocked < intact - 1e-3
