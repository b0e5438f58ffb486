"""The rules of the training-time mitigations, pinned on hand-made cases."""

import copy
import json

import numpy as np
import pytest
import torch

from lethe.data.shards import assign_shards
from lethe.errors import LetheError
from lethe.methods.wen_inference import settings as wen_settings
from lethe.models.diffusion_model import add_raunet, build_scheduler, load_model, save_model
from lethe.models.raunet import RAUNet, TimestepRouter, level_skips, skip_channels
from lethe.training.agc import AntiGradientControl
from lethe.training.ensemble import ProxyEnsemble, average_into, redistribute, shift_images
from lethe.training.fit import CaptionedImages, StepBatches, fit
from lethe.methods.random_caption import RandomCaptionWords
from lethe.training.wen_filter import WenFilter


def _filled(bank, values):
    """A bank whose ranges have all seen enough samples, holding `values`."""
    bank.values.copy_(torch.as_tensor(values, dtype=torch.float))
    bank.seen.fill_(bank.min_samples)


def test_agc_keeps_and_skips_by_the_bank_and_updates_it_with_every_sample():
    agc = AntiGradientControl(num_timesteps=10, lam=2.0, momentum=0.8, bins=5, min_samples=2)  # ranges of 2 timesteps
    _filled(agc.bank, [0.0, 1.0, 0.0, 0.1, 0.0])
    losses = torch.tensor([0.6, 0.4, 0.04, 0.05])
    t = torch.tensor([3, 2, 7, 6])  # ranges 1, 1, 3, 3
    keep, threshold = agc(losses, t)
    # 2·0.6 >= 1 kept; 2·0.4 < 1 skipped; 2·0.04 < 0.1 skipped; 2·0.05 >= 0.1 kept
    assert keep.tolist() == [True, False, False, True]
    assert threshold.tolist() == pytest.approx([1.0, 1.0, 0.1, 0.1])
    # every sample, kept or skipped, updates its range's bank in turn
    m1 = 0.8 * (0.8 * 1.0 + 0.2 * 0.6) + 0.2 * 0.4
    m3 = 0.8 * (0.8 * 0.1 + 0.2 * 0.04) + 0.2 * 0.05
    assert agc.bank.values.tolist() == pytest.approx([0.0, m1, 0.0, m3, 0.0])
    assert agc.bank.seen.tolist() == [2, 4, 2, 4, 2]


def test_agc_skips_nothing_until_a_range_has_seen_min_samples_and_pools_them_exactly():
    agc = AntiGradientControl(num_timesteps=10, lam=1.0, momentum=0.8, bins=2, min_samples=3)
    keep, _ = agc(torch.tensor([1e-6, 5.0, 1.0]), torch.tensor([0, 1, 2]))  # range 0's first three losses
    assert keep.all()
    assert agc.bank.values[0].item() == pytest.approx((1e-6 + 5.0 + 1.0) / 3)  # a plain mean, not a zero-started one
    keep, threshold = agc(torch.tensor([1.0, 1e-6]), torch.tensor([4, 9]))
    assert keep.tolist() == [False, True]  # range 0 judges now (1 < 2.0); range 1 has seen nothing yet
    assert threshold[0].item() == pytest.approx(2.0)


def test_taa_closeness_is_one_at_the_threshold_and_falls_away_from_it():
    agc = AntiGradientControl(num_timesteps=5, lam=2.0)
    a = agc.closeness(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]))
    assert a[0].item() == pytest.approx(1.0)
    assert a[1].item() == pytest.approx(np.exp(-5.0))


def test_averaging_two_proxies_gives_the_weighted_mean():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    average_into([a, b], [1.0, 1.0])
    assert torch.allclose(a.weight, (wa + wb) / 2) and torch.equal(a.weight, b.weight)
    c, d = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    wc, wd = c.bias.detach().clone(), d.bias.detach().clone()
    average_into([c, d], [3.0, 1.0])
    assert torch.allclose(d.bias, 0.75 * wc + 0.25 * wd)


def test_redistribution_moves_the_most_skipped_share_to_the_next_shard():
    assignment = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    skips = np.array([5, 0, 9, 1, 0, 7, 0, 0, 3, 0, 0, 8])
    moved = redistribute(assignment, skips, shards=3, share=0.5)
    assert np.bincount(moved).tolist() == [4, 4, 4]  # sizes kept
    assert moved[[2, 0]].tolist() == [1, 1]  # shard 0's two most skipped go to shard 1
    assert moved[5] == 2 and moved[[11, 8]].tolist() == [0, 0]  # ring: shard 2 hands to shard 0
    assert (moved != assignment).sum() == 6


def test_shards_are_balanced_and_cover_every_sample():
    assignment = assign_shards(103, 4, seed=0)
    assert sorted(np.bincount(assignment).tolist()) == [25, 26, 26, 26]


def test_raunet_with_identity_blocks_gives_the_unets_output(tiny_model):
    unet = tiny_model.unet
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    states = torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=states).sample
        rau = RAUNet(unet, "conv", skips=level_skips(unet, (0, 1)), init="identity")
        same = rau(x, t, encoder_hidden_states=states).sample
        rau.blocks["0"][0].convs[0].weight.add_(0.5)
        changed = rau(x, t, encoder_hidden_states=states).sample
    assert torch.allclose(plain, same, atol=1e-5)
    assert not torch.allclose(plain, changed, atol=1e-3)


def test_skip_channels_match_what_the_up_blocks_receive(tiny_model):
    seen = []
    for block in tiny_model.unet.up_blocks:
        block.register_forward_pre_hook(
            lambda m, a, kw: seen.append([s.shape[1] for s in kw["res_hidden_states_tuple"]]), with_kwargs=True)
    tiny_model.unet(torch.randn(1, 1, 16, 16), 5, encoder_hidden_states=torch.randn(1, 3, tiny_model.unet.config.cross_attention_dim))
    assert seen == skip_channels(tiny_model.unet)


@pytest.mark.parametrize("block", ["conv", "conv_silu", "conv_stack", "pool", "drop", "none"])
def test_every_block_type_keeps_shapes(tiny_model, block):
    rau = RAUNet(tiny_model.unet, block, skips=level_skips(tiny_model.unet, (0,)))
    out = rau(torch.randn(2, 1, 16, 16), 5, encoder_hidden_states=torch.randn(2, 3, tiny_model.unet.config.cross_attention_dim)).sample
    assert out.shape == (2, 1, 16, 16)


class Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, sample, timestep, encoder_hidden_states):
        return type("Out", (), {"sample": torch.full_like(sample, self.value)})()


def test_router_sends_each_timestep_to_the_right_network():
    router = TimestepRouter(Constant(1.0), Constant(2.0), tau=500)
    x = torch.zeros(4, 1, 2, 2)
    out = router(x, torch.tensor([0, 499, 500, 999]), encoder_hidden_states=torch.zeros(4, 3, 8)).sample
    assert out[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert router(x, torch.tensor(700), encoder_hidden_states=torch.zeros(4, 3, 8)).sample.unique().tolist() == [2.0]
    assert router(x, 499, encoder_hidden_states=torch.zeros(4, 3, 8)).sample.unique().tolist() == [1.0]


def test_raunet_blocks_are_saved_loaded_and_trained(tiny_model, tmp_path):
    add_raunet(tiny_model, "conv", tau=500, init="random", levels=(0, 1))
    keys = list(tiny_model.trainable_state_dict())
    assert any(k.startswith("unet.high.unet.up_blocks.0.skip_transfer.0.") for k in keys)
    assert any(k.startswith("unet.low.") for k in keys)
    t = torch.tensor([100, 800])
    out = tiny_model.unet(torch.randn(2, 1, 16, 16), t, encoder_hidden_states=torch.randn(2, 3, tiny_model.unet.config.cross_attention_dim)).sample
    out.square().mean().backward()
    assert tiny_model.unet.high.blocks["0"][0].convs[0].weight.grad.abs().sum() > 0
    copied = copy.deepcopy(tiny_model.unet.high)  # a copy runs its own blocks, not the original's
    with torch.no_grad():
        copied.blocks["0"][0].convs[0].weight.zero_()
        x, states = torch.randn(1, 1, 16, 16), torch.randn(1, 3, tiny_model.unet.config.cross_attention_dim)
        assert not torch.equal(copied(x, 900, states).sample, tiny_model.unet.high(x, 900, states).sample)
    save_model(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for (k, a), b in zip(tiny_model.trainable_state_dict().items(), loaded.trainable_state_dict().values()):
        assert torch.equal(a, b), k


def test_wen_filter_drops_a_sample_far_above_the_usual_magnitude():
    wen = WenFilter(num_timesteps=10, factor=1.5, bins=2, min_samples=1)
    _filled(wen.bank, [1.0, 1.0])
    cond = torch.zeros(3, 4)
    uncond = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [1.4, 0, 0, 0]])
    keep = wen(cond, uncond, torch.tensor([1, 1, 2]))
    assert keep.tolist() == [True, False, True]


def test_wen_filter_leaves_dropped_captions_out_of_its_bank():
    """A dropped caption's magnitude is 0; folded in, it would pull the bank down and skip more samples."""
    wen = WenFilter(num_timesteps=10, factor=1.5, momentum=0.5, bins=10, min_samples=1)
    _filled(wen.bank, [1.0] * 10)
    cond, uncond = torch.zeros(2, 4), torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    keep = wen(cond, uncond, torch.tensor([3, 4]), judged=torch.tensor([True, False]))
    assert keep.tolist() == [True, True]
    assert wen.bank.values[3] == 1.0 and wen.bank.values[4] == 1.0  # 1.0 folded in at t=3; t=4 untouched
    assert wen.bank.seen[3] == 2 and wen.bank.seen[4] == 1


def test_random_skip_drops_the_followed_share_at_each_step():
    from lethe.training.random_skip import RandomSkip

    control = RandomSkip([0.0, 0.25, 0.5], seed=3)
    assert [int((~control(step, 8)).sum()) for step in range(4)] == [0, 2, 4, 0]  # past the curve: nothing
    assert torch.equal(control(1, 8), RandomSkip([0.0, 0.25], seed=3)(1, 8))  # drawn from (seed, step) alone
    assert int((~RandomSkip(0.25, seed=0)(7, 64)).sum()) == 16  # a fixed share


def test_random_skip_without_the_followed_curve_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from lethe.errors import LetheError
    from lethe.training.random_skip import followed_curve

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LetheError, match=r"models/wen_filter/skipped_per_step.json.*train@wen_filter"):
        followed_curve("wen_filter")
    (tmp_path / "models/wen_filter").mkdir(parents=True)
    (tmp_path / "models/wen_filter/skipped_per_step.json").write_text("[0.5, 2.0]")
    with pytest.raises(LetheError, match="not a list of skipped shares"):
        followed_curve("wen_filter")


def test_random_caption_words_come_from_the_vocabulary():
    noise = RandomCaptionWords(["a red cat", "a blue dog"], words=2, probability=1.0, seed=0)
    out = noise("a red cat").split()
    assert out[:3] == ["a", "red", "cat"] and len(out) == 5
    assert set(out[3:]) <= {"a", "red", "blue", "cat", "dog"}
    # a draw's words depend on the draw (step, position) alone: a resumed run draws what the whole run drew
    many = RandomCaptionWords(["a b c d e f g h i j k l"], words=3, probability=1.0, seed=0)
    first = [many("x", (step, 0)) for step in range(5)]
    assert [many("x", (step, 0)) for step in reversed(range(5))] == first[::-1]
    assert len(set(first)) > 1 and many("x", (2, 1)) != many("x", (2, 0))


def test_step_batches_resume_with_the_same_batches():
    pool = lambda step: np.arange(50)  # noqa: E731
    full = list(StepBatches(pool, steps=6, batch_size=4, seed=3))
    resumed = list(StepBatches(pool, steps=6, batch_size=4, seed=3, start=lambda: 4))
    assert resumed == full[4:]


def test_shift_images_moves_pixels_and_keeps_unshifted_ones():
    images = torch.zeros(2, 1, 8, 8)
    images[:, :, 4, 4] = 1.0
    out = shift_images(images, torch.tensor([0, 2]), torch.Generator().manual_seed(1))
    assert torch.equal(out[0], images[0]) and out[1].sum() <= 1.0


def test_ensemble_trains_proxies_on_their_shards_and_merges_them(smoke_params, tiny_data, tiny_model, tmp_path):
    records = tiny_data.training_records("target")
    cfg = smoke_params.finetune.model_copy(update={"steps": 8, "batch_size": 4})
    assignment = assign_shards(len(records), 2, seed=0)
    module = ProxyEnsemble(tiny_model, build_scheduler(tiny_model, smoke_params.diffusion), cfg,
                           assignment=assignment, local_steps=2, agc_lambda=2.0, msr_share=0.25, taa_max_shift=1)
    seen = {0: set(), 1: set()}
    original = module.select

    def spy(d, batch, model):
        seen[module.proxy_index(module.current_step)].update(batch["index"].tolist())
        return original(d, batch, model)

    module.select = spy
    dataset = CaptionedImages(tiny_data, records, tiny_model.text_encoder.tokenize)
    fit(module, dataset, cfg, tmp_path / "ckpt")
    # steps 0-1 proxy 0, 2-3 proxy 1, round 1 averages; round 2 redistributes
    assert seen[0] and seen[1]
    assert sorted(np.bincount(module.assignment.numpy()).tolist()) == sorted(np.bincount(assignment).tolist())
    merged = module.trained_model()
    for a, b in zip(module.proxies[0].parameters(), module.proxies[1].parameters()):
        assert torch.equal(a, b)
    assert merged is module.proxies[0]


def test_a_killed_ensemble_resumes_mid_round_to_the_uninterrupted_runs_weights(smoke_params, tiny_data, tiny_model,
                                                                                 tmp_path):
    """IET-AGC+ (proxies, anti-gradient banks, threshold-aware shifts, redistribution): killed at step 7, mid
    round, after the checkpoint at step 5, and resumed in a fresh module; every weight and buffer equals an
    uninterrupted run's bit for bit."""
    import copy

    import lightning as L

    class Crash(Exception):
        pass

    class StopAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise Crash

    records = tiny_data.training_records("target")
    cfg = smoke_params.finetune.model_copy(update={"steps": 12, "batch_size": 4, "checkpoint_every": 5})
    fresh = [copy.deepcopy(tiny_model) for _ in range(2)]

    def ensemble(model):
        return ProxyEnsemble(model, build_scheduler(model, smoke_params.diffusion), cfg,
                             assignment=assign_shards(len(records), 2, seed=0), local_steps=2, agc_lambda=1.0,
                             msr_share=0.25, taa_max_shift=1)

    dataset = CaptionedImages(tiny_data, records, tiny_model.text_encoder.tokenize)
    whole = ensemble(tiny_model)
    fit(whole, dataset, cfg, tmp_path / "whole")
    with pytest.raises(Crash):
        fit(ensemble(fresh[0]), dataset, cfg, tmp_path / "killed", callbacks=[StopAt()])
    resumed = ensemble(fresh[1])
    assert fit(resumed, dataset, cfg, tmp_path / "killed").resumed_from is not None
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert int(whole.skips.sum()) + int(whole.round_counts.sum()) > 0  # the state that had to survive the kill


def test_taa_redraws_kept_samples_at_the_threshold_shifted(smoke_params, tiny_data, tiny_model):
    """Losses exactly at the threshold (closeness 1) are all augmented: their shifted copies replace them."""
    from torch.utils.data import default_collate

    records = tiny_data.training_records("target")[:4]
    cfg = smoke_params.finetune.model_copy(update={"batch_size": 4})
    module = ProxyEnsemble(tiny_model, build_scheduler(tiny_model, smoke_params.diffusion), cfg,
                           assignment=assign_shards(4, 1, seed=0), local_steps=2, agc_lambda=2.0, msr_share=0.25,
                           taa_max_shift=1)
    module.current_step = 0
    dataset = CaptionedImages(tiny_data, records, tiny_model.text_encoder.tokenize)
    batch = default_collate([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    d = module.denoise(batch)
    keep = torch.tensor([True, False, True, True])
    module._threshold = 2.0 * d.losses.detach()  # lambda * loss == threshold: closeness 1
    module._ready = torch.ones(4, dtype=torch.bool)  # ranges that have seen enough to judge
    redrawn = []
    original = module.denoise
    module.denoise = lambda b, m=None, t=None: redrawn.append((b, t)) or original(b, m, t)
    loss = module.kept_loss(d, keep, batch, tiny_model)
    ((shifted, t),) = redrawn
    assert torch.equal(t, d.t[keep]) and torch.equal(shifted["ids"], batch["ids"][keep])  # the kept rows only
    assert shifted["images"].shape == (3, *batch["images"].shape[1:])
    assert not torch.equal(shifted["images"], batch["images"][keep])  # shifted by one pixel
    assert loss.ndim == 0 and torch.isfinite(loss)
    redrawn.clear()
    module._ready = torch.zeros(4, dtype=torch.bool)  # a range that judges nothing augments nothing
    module.kept_loss(d, keep, batch, tiny_model)
    assert redrawn == []


def test_the_ensembles_control_skips_the_followed_share_blindly_while_the_banks_follow(smoke_params, tiny_data,
                                                                                       tiny_model):
    """random_skip_ietagc: IET-AGC's proxies with the blind choice in place of anti-gradient control's."""
    from torch.utils.data import default_collate

    from lethe.training.random_skip import RandomSkip

    records = tiny_data.training_records("target")[:4]
    cfg = smoke_params.finetune.model_copy(update={"batch_size": 4})
    blind = RandomSkip([0.5], seed=0)
    module = ProxyEnsemble(tiny_model, build_scheduler(tiny_model, smoke_params.diffusion), cfg,
                           assignment=assign_shards(4, 1, seed=0), local_steps=2, agc_lambda=1e-6, keep=blind)
    module.current_step = 0
    dataset = CaptionedImages(tiny_data, records, tiny_model.text_encoder.tokenize)
    batch = default_collate([dataset[i] for i in range(4)])
    d = module.denoise(batch)
    keep = module.select(d, batch, tiny_model)
    assert torch.equal(keep, blind(0, 4)) and int(keep.sum()) == 2  # lambda ~ 0 would skip every sample
    assert module.agc[0].bank.seen.sum() == 4  # the bank took the batch in all the same
    assert module.skips.sum() == 2  # IET-AGC+'s redistribution counts the blind skips


def test_a_control_is_declared_against_its_method_and_reads_what_its_structure_reads(smoke_params):
    from lethe.methods import TRAINING

    for name, method, reads in (("random_skip_ietagc", "ietagc", ("ietagc",)),
                                ("random_skip_ietagc_plus", "ietagc_plus", ("ietagc", "ietagc_plus")),
                                ("random_skip_memattn_filter", "memattn_filter", ()),
                                ("iet", "ietagc", ("ietagc",)), ("random_skip", "wen_filter", ("random_skip",))):
        declared = TRAINING[name]
        assert declared.controls(smoke_params) == method and declared.reads == reads, name
    assert TRAINING["random_skip_ietagc"].inputs(smoke_params) == ("data/shards.json",
                                                                    "models/ietagc/skipped_per_step.json")


def test_wen_target_defaults_to_a_fraction_of_the_tune_splits_magnitude(smoke_params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = smoke_params.model_copy(update={"wen_inference": smoke_params.wen_inference.model_copy(
        update={"target": None, "target_fraction": 0.5})})
    with pytest.raises(LetheError, match="metrics/detect.json"):
        wen_settings(params)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/detect.json").write_text(json.dumps({"detection/wen_first/mean/holdout": 0.2}))
    with pytest.raises(LetheError, match="data.tune_size"):  # the judged holdout prompts never set it
        wen_settings(params)
    (tmp_path / "metrics/detect.json").write_text(json.dumps({"detection/wen_first/mean/holdout": 0.9,
                                                              "detection/wen_first/mean/tune": 0.2}))
    assert wen_settings(params)["target"] == pytest.approx(0.1)
    fixed = params.model_copy(update={"wen_inference": params.wen_inference.model_copy(update={"target": 0.3})})
    assert wen_settings(fixed)["target"] == 0.3  # an explicit target is used as is
