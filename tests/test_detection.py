"""Detection on a planted case, the packaged inference-time mitigations, and MemAttn's training filter."""

import copy

import pytest
import torch

from lethe.config import SampleConfig
from lethe.sampling import first_step
from lethe.memorization.detectors import memattn_scores, nemo_scores, wen_scores
from lethe.models.diffusion_model import build_scheduler, load_model, save_model
from lethe.sampling import SamplingTrace, generate
from lethe.training.fit import CaptionedImages, fit
from lethe.training.memattn_filter import EntropyFilter, MemAttnFilteredTraining
from lethe.training.module import DiffusionTraining


def scores_for(model, scheduler, prompt):
    trace = SamplingTrace()
    generate(model, scheduler, [prompt] * 4, [0, 1, 2, 3], SampleConfig(steps=10), trace)
    out = {k: v.mean().item() for k, v in wen_scores(trace.magnitudes).items()}
    out |= {k: v.mean().item() for k, v in memattn_scores(trace.maps, trace.token_ids, model.text_encoder.end_token_id, 0).items()}
    t, noise = first_step(model, scheduler, 10, 6)
    out["nemo_ssim"] = nemo_scores(model.unet, t, noise, model.encode_text(model.text_encoder.tokenize([prompt]))).item()
    return out


def test_scores_separate_a_model_trained_to_copy_a_planted_image(smoke_params, tiny_data, tiny_model, tmp_path):
    """The same prompt on two models trained alike, one of them with the planted pair copied many times.

    Wen's magnitudes separate them 4-6x at 300 steps for training seeds 0, 1 and 2 (at 120 steps they did not,
    for two of three). NeMo's SSIM score is not asserted: on this tiny model it ranked the copying model
    higher for seeds 0 and 2 and lower for 1, the cross-attention signal being too weak at this size."""
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    target = tiny_data.split("target")
    planted, others = target[0], target[1:]
    untrained = copy.deepcopy(tiny_model)  # never sees the planted pair
    cfg = smoke_params.finetune.model_copy(update={"steps": 300, "batch_size": 16, "lr": 3e-3, "ema_decay": 0.5})
    tokenize = tiny_model.text_encoder.tokenize
    fit(DiffusionTraining(tiny_model, scheduler, cfg), CaptionedImages(tiny_data, [planted] * 16 + others, tokenize),
        cfg, tmp_path / "copy")
    fit(DiffusionTraining(untrained, scheduler, cfg), CaptionedImages(tiny_data, others, tokenize), cfg, tmp_path / "other")
    trained, fresh = scores_for(tiny_model, scheduler, planted.caption), scores_for(untrained, scheduler, planted.caption)
    assert trained["wen_first"] > 2 * fresh["wen_first"]
    assert trained["wen_all"] > 2 * fresh["wen_all"]
    assert 0.0 <= trained["nemo_ssim"] <= 1.0 and 0.0 <= fresh["nemo_ssim"] <= 1.0


def test_packaged_mitigations_change_generation_and_survive_save_and_load(smoke_params, tiny_model, tmp_path):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    prompts, seeds, cfg = ["a bold thin handwritten one from a ledger"] * 2, [0, 1], SampleConfig(steps=4)
    plain = generate(tiny_model, scheduler, prompts, seeds, cfg)
    for settings in ({"memattn": {"begin_scale": 1.5, "mask_padding": True}},
                     {"wen_inference": {"lr": 0.5, "iterations": 3, "target": 1e-6}}):
        tiny_model.spec.inference = settings
        save_model(tiny_model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert loaded.spec.inference == settings
        mitigated = generate(loaded, scheduler, prompts, seeds, cfg)
        assert mitigated.shape == plain.shape and not torch.allclose(mitigated, plain, atol=1e-4)
        assert torch.allclose(generate(loaded, scheduler, prompts, seeds, cfg), mitigated, atol=1e-5)  # repeatable
    tiny_model.spec.inference = {}


def test_wen_optimisation_lowers_the_magnitude_and_keeps_the_beginning_token(smoke_params, tiny_model):
    from lethe.memorization.noise_magnitude import noise_magnitude
    from lethe.inference.prompt_embedding import optimise_prompt_embedding

    unet = tiny_model.unet
    ids = tiny_model.text_encoder.tokenize(["a bold thin handwritten one from a ledger", "a seven"])
    cond, empty = tiny_model.encode_text(ids).detach(), tiny_model.encode_text(tiny_model.text_encoder.tokenize([""])).detach()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = noise_magnitude(unet(x, 980, encoder_hidden_states=cond).sample, unet(x, 980, encoder_hidden_states=empty.expand_as(cond)).sample)
    new = optimise_prompt_embedding(unet, 980, x, cond, empty, lr=0.05, iterations=10, target=float(before[1]) + 1e-3)
    with torch.no_grad():
        after = noise_magnitude(unet(x, 980, encoder_hidden_states=new).sample, unet(x, 980, encoder_hidden_states=empty.expand_as(cond)).sample)
    assert after[0] < before[0]  # optimised
    assert torch.equal(new[1], cond[1])  # already below target: untouched
    assert torch.equal(new[:, 0], cond[:, 0])  # the beginning token never moves


def test_entropy_filter_skips_outliers_and_learns_from_every_sample():
    f = EntropyFilter(z=2.0, momentum=0.5, warmup=4)
    assert f(torch.tensor([1.0, 1.2, 0.8, 1.0])).all()  # the first samples only set the statistics
    assert f.stats[0].tolist() == pytest.approx([4, 1.0, 0.02])
    keep = f(torch.tensor([1.0, 1.1, 3.0]))
    assert keep.tolist() == [True, True, False]
    assert f.stats[0, 1].item() > 1.0  # the skipped outlier still moved the running mean


def test_entropy_filter_judges_nothing_before_its_warmup():
    f = EntropyFilter(z=2.0, momentum=0.5, warmup=8)
    assert f(torch.tensor([1.0, 1.0])).all() and f(torch.tensor([1.0, 50.0])).all()  # 2, then 4 seen
    assert f.stats[0, 0] == 4 and f.stats[0, 2] > 0  # pooled exactly: one row never makes a zero variance


def test_entropy_filter_judges_each_timestep_range_apart_and_ignores_dropped_captions():
    f = EntropyFilter(z=2.0, momentum=0.5, num_timesteps=1000, bins=2, warmup=3)
    t = torch.tensor([100, 100, 100, 900, 900, 900])
    f(torch.tensor([3.0, 3.1, 2.9, 1.0, 1.1, 0.9]), t)  # early steps attend more broadly than late ones
    # 2.0 is usual at t=900's range but far below t=100's; one threshold over both would skip neither
    keep = f(torch.tensor([3.0, 2.0, 2.0, 1.0]), torch.tensor([100, 100, 900, 900]))
    assert keep.tolist() == [True, True, False, True]
    before = f.stats.clone()
    judged = torch.tensor([False, False])
    assert f(torch.tensor([9.0, 9.0]), torch.tensor([100, 900]), judged).all()  # empty prompts: kept ...
    assert torch.equal(f.stats, before)  # ... and not folded into the statistics


def test_memattn_filter_trains_and_logs_skips(smoke_params, tiny_data, tiny_model, tmp_path):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    cfg = smoke_params.finetune.model_copy(update={"steps": 6})
    module = MemAttnFilteredTraining(tiny_model, scheduler, cfg, layer=0, z=0.5, momentum=0.5)
    dataset = CaptionedImages(tiny_data, tiny_data.training_records("target"), tiny_model.text_encoder.tokenize)
    fit(module, dataset, cfg, tmp_path / "ckpt")
    seen = module.filter.stats[:, 0]
    assert seen.sum() > 0 and (module.filter.stats[seen > 1, 2] > 0).all()


def test_nemo_scores_the_second_timestep_of_a_50_step_schedule_as_its_authors_code(tiny_model):
    """NeMo's code returns at step index 1 of 50 without stepping x_T: t = 961 on SD's schedule (steps_offset 1)."""
    from diffusers import DDPMScheduler

    from lethe.sampling import nemo_step

    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    t, noise = nemo_step(tiny_model, sd, 3)
    assert int(t) == 961 and noise.shape == (3, *tiny_model.sample_shape)
    assert int(nemo_step(tiny_model, DDPMScheduler(), 1)[0]) == 960


def test_begin_mass_reads_the_first_steps_beginning_token_share_in_es_layer():
    from lethe.memorization.detectors import begin_mass

    maps = {"down": torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]), "up": torch.tensor([[[0.2, 0.4, 0.4], [1.0, 0.0, 0.0]]])}
    assert begin_mass(maps, 0).tolist() == pytest.approx([0.7]) and begin_mass(maps, 1).tolist() == pytest.approx([0.2])
