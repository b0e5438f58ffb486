"""LoyalDiffusion's measured choice (lethe.search.loyal): skips by importance, tau from the memorization gap."""

import json

import numpy as np
import pytest
import torch

from lethe.config import load_params
from lethe.errors import LetheError
from lethe.methods.loyal import chosen
from lethe.models.diffusion_model import add_raunet, build_scheduler, load_model, save_model
from lethe.models.raunet import RAUNet
from lethe.search import loyal


def unet_inputs(unet, n=2):
    torch.manual_seed(1)
    return torch.randn(n, 1, 16, 16), torch.tensor([10, 900][:n]), torch.randn(n, 5, unet.config.cross_attention_dim)


def test_all_skips_are_what_the_up_blocks_receive(tiny_model):
    assert loyal.all_skips(tiny_model.unet) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # two levels, two skips each


def test_a_dropped_skip_changes_the_output_and_is_restored(tiny_model):
    unet = tiny_model.unet
    x, t, states = unet_inputs(unet)
    with torch.no_grad():
        intact = unet(x, t, encoder_hidden_states=states).sample
        with loyal.dropped(unet, (1, 1)):
            dropped = unet(x, t, encoder_hidden_states=states).sample
        with loyal.dropped(unet, None):
            untouched = unet(x, t, encoder_hidden_states=states).sample
        after = unet(x, t, encoder_hidden_states=states).sample
    assert not torch.allclose(intact, dropped, atol=1e-4)
    assert torch.equal(intact, untouched) and torch.equal(intact, after)


def test_dropping_a_skip_is_a_drop_transfer_block_on_that_skip_alone(tiny_model):
    import copy

    unet = tiny_model.unet
    x, t, states = unet_inputs(unet)
    rau = RAUNet(copy.deepcopy(unet), "drop", skips=[(0, 1)])
    with torch.no_grad(), loyal.dropped(unet, (0, 1)):
        assert torch.allclose(unet(x, t, encoder_hidden_states=states).sample,
                              rau(x, t, encoder_hidden_states=states).sample, atol=1e-6)


def test_chosen_skips_cost_least_fd_or_cut_replication_most():
    importance = [{"skip": [0, 0], "fd_change": 3.0, "replication_change": -0.30},
                  {"skip": [0, 1], "fd_change": -0.5, "replication_change": 0.0},
                  {"skip": [1, 0], "fd_change": 0.2, "replication_change": -0.05},
                  {"skip": [1, 1], "fd_change": 8.0, "replication_change": -0.05}]
    assert loyal.choose_skips(importance, 0.5) == [(0, 1), (1, 0)]
    assert loyal.choose_skips(importance, 0.1) == [(0, 1)]  # at least one
    assert loyal.choose_skips(importance, 1.0) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert loyal.choose_skips(importance, 0.5, by="replication") == [(0, 0), (1, 0)]  # the tie goes to the lower FD


def test_replication_sensitivity_is_paired_with_the_intact_baseline():
    flags = {None: np.array([1, 1, 1, 0, 1, 1]), (0, 0): np.array([0, 0, 1, 0, 1, 1]), (1, 1): np.array([1, 1, 1, 0, 1, 1])}
    out = loyal.replication_sensitivity(lambda skip: flags[skip], [(0, 0), (1, 1)], n_prompts=3, per_prompt=2, bootstrap=50)
    assert out[(0, 0)]["replication_intact"] == pytest.approx(5 / 6)
    assert out[(0, 0)]["replication_change"] == pytest.approx(-2 / 6)  # prompt 0 stopped copying
    assert out[(1, 1)]["replication_change"] == 0.0 and out[(1, 1)]["replication_change_low"] == 0.0


def test_tau_is_the_smallest_t_whose_gap_reaches_the_share_of_the_peak():
    rows = [{"t": 0, "gap": 0.0}, {"t": 250, "gap": 0.1}, {"t": 500, "gap": 0.35}, {"t": 750, "gap": 0.6}, {"t": 960, "gap": 0.5}]
    assert loyal.split_at(rows, 0.5) == 500  # 0.35 >= 0.3, 0.1 is not
    assert loyal.split_at(rows, 0.9) == 750
    assert loyal.split_at([{"t": 0, "gap": 0.0}, {"t": 500, "gap": -0.1}], 0.5) is None  # no memorization measured


def test_analysis_timesteps_are_the_samplers_spread_evenly(smoke_params, tiny_model):
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    assert loyal.analysis_timesteps(scheduler, 25, 5) == [0, 240, 480, 720, 960]  # DDIM's 25 steps: 0, 40, ..., 960
    assert loyal.analysis_timesteps(scheduler, 4, 10) == [0, 250, 500, 750]  # never more than the sampler's steps


def test_memorization_over_t_on_a_model_that_remembers_planted_images_above_t_300():
    planted = loyal.Group("dup", torch.eye(4), ["a"] * 4)
    holdout = loyal.Group("holdout", torch.eye(4).flip(0), ["b"] * 4)

    def denoise(images, captions, t):  # below t = 300 the input survives; above, only planted images come back
        if t < 300 or captions[0] == "a":
            return images.clone()
        return images.roll(1, dims=1)  # another image: similarity 0 to the source

    rows = loyal.memorization_over_t(denoise, lambda x: x, [planted, holdout], [0, 200, 400, 800], 0.9, bootstrap=50)
    assert [r["dup"] for r in rows] == [1.0, 1.0, 1.0, 1.0]
    assert [r["holdout"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["gap"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert loyal.split_at(rows, 0.5) == 400
    assert rows[2]["dup/ci_low"] == rows[2]["dup/ci_high"] == 1.0


def test_denoise_from_t_zero_returns_the_input_for_a_model_that_predicts_its_noise(smoke_params, tiny_model):
    """At t = 0 the sampler takes one DDIM step; with the true noise predicted, it lands back on x0."""
    scheduler = build_scheduler(tiny_model, smoke_params.diffusion)
    images = torch.rand(3, 1, 16, 16) * 2 - 1

    class Oracle(torch.nn.Module):  # predicts the noise that `denoise_from` added (image i: seed i)
        config = tiny_model.unet.config
        device = torch.device("cpu")

        def forward(self, sample, timestep, encoder_hidden_states):
            noise = torch.stack([torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)])
            return type("Out", (), {"sample": torch.cat([noise, noise])[: len(sample)]})()

    tiny_model.unet = Oracle()
    out = loyal.denoise_from(tiny_model, scheduler, images, ["a"] * 3, 0, steps=4, guidance_scale=1.5, batch_size=8)
    assert torch.allclose(out, images.clamp(-1, 1), atol=1e-4)


def test_raunet_blocks_only_the_chosen_skips_and_saves_them(tiny_model, tmp_path):
    add_raunet(tiny_model, "conv", [(1, 0)], tau=0, init="identity")
    keys = [k for k in tiny_model.trainable_state_dict() if "skip_transfer" in k]
    assert keys == ["unet.unet.up_blocks.1.skip_transfer.0.convs.0.weight", "unet.unet.up_blocks.1.skip_transfer.0.convs.0.bias"]
    assert tiny_model.spec.raunet == {"block": "conv", "skips": [[1, 0]], "tau": 0, "init": "identity"}
    save_model(tiny_model, tmp_path / "m")
    assert load_model(tmp_path / "m").spec.raunet["skips"] == [[1, 0]]


def test_a_config_saved_with_levels_loads_every_skip_of_those_levels(tiny_model, tmp_path):
    add_raunet(tiny_model, "drop", [(0, 0), (0, 1)], tau=0)
    save_model(tiny_model, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "raunet": {"block": "drop", "levels": [0], "tau": 0,
                                                                                "init": "random"}}))
    assert load_model(tmp_path / "m").spec.raunet["skips"] == [[0, 0], [0, 1]]


def test_a_skip_that_does_not_exist_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"skip \[1, 2\] does not exist"):
        RAUNet(tiny_model.unet, "conv", skips=[(1, 2)])


def test_loyal_reads_the_measured_choice_or_the_fixed_one(project):
    params = load_params("params.yaml")
    with pytest.raises(LetheError, match="search/loyal.json: missing"):
        chosen(params)
    (project / "search").mkdir()
    (project / "search/loyal.json").write_text(json.dumps({"skips": [[1, 1]], "tau": 240}))
    assert chosen(params) == ([(1, 1)], 240)
    fixed = params.model_copy(update={"loyal": params.loyal.model_copy(update={"choose": "fixed", "tau": 300})})
    assert chosen(fixed) == (None, 300)


def test_skip_importance_pairs_each_dropped_skip_with_the_intact_generations():
    class Distances:  # FD = the mean feature: what each skip's generations move
        def frechet(self, features):
            return float(features.mean())

    generated = {None: torch.ones(8, 2), (0, 0): torch.full((8, 2), 3.0), (1, 0): torch.full((8, 2), 0.5)}
    rows = loyal.skip_importance(lambda skip: generated[skip], [(0, 0), (1, 0)], Distances(), n_prompts=4, per_prompt=2,
                                 bootstrap=20)
    assert [r["fd_change"] for r in rows] == [2.0, -0.5]
    assert [r["fd_relative"] for r in rows] == [2.0, -0.5]
    assert all(r["fd_intact"] == 1.0 for r in rows)
    assert np.isclose(rows[0]["fd_relative_low"], 2.0) and np.isclose(rows[0]["fd_relative_high"], 2.0)


def test_tau_never_splits_at_t_zero():
    rows = [{"t": 0, "gap": 0.02}, {"t": 120, "gap": 0.03}, {"t": 500, "gap": 0.01}]
    assert loyal.split_at(rows, 0.5) == 120  # t = 0's gap (nothing noised) is not memorization
    assert loyal.split_at([{"t": 0, "gap": 0.5}, {"t": 120, "gap": 0.0}], 0.5) is None


def test_fixed_choice_is_written_without_measuring(project, smoke_params, tiny_model):
    from lethe.stages.select_loyal import select_loyal

    save_model(tiny_model, project / "models/pretrained")
    fixed = smoke_params.model_copy(update={"loyal": smoke_params.loyal.model_copy(update={"choose": "fixed", "levels": (0,)})})
    choice = select_loyal(fixed)  # no data, no baseline: nothing is measured
    assert choice == {"skips": [[0, 0], [0, 1]], "tau": 500, "tau_from": "fixed", "skips_total": 4}
    assert json.loads((project / "search/loyal.json").read_text()) == choice


def test_block_none_is_the_unet_itself(tiny_model):
    """loyal.block: none is the control of LoyalDiffusion's mechanism: the timestep split without blocks."""
    import copy

    unet = tiny_model.unet
    x, t, states = unet_inputs(unet)
    rau = RAUNet(copy.deepcopy(unet), "none", skips=loyal.all_skips(unet))
    assert not list(rau.blocks["0"].parameters())
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, rau(x, t, encoder_hidden_states=states).sample)
