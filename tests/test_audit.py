"""`lethe audit`: the algorithm on worked numbers, a model a user brings (a tiny random SD-shaped pipeline
with LoRA weights in diffusers' format, an image folder), resuming a killed audit, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lethe.cli import main
from lethe.errors import LetheError
from lethe.memorization.audit import Judged, calibrated_threshold, generation_rate, reproduced_share, select
from tests.test_scale import SD_PRESET, write_params
from tests.tiny_sd import build_tiny_sd

# ------------------------------------------------------------------------------------ the algorithm


def test_each_training_image_is_judged_by_its_closest_generation():
    """Relative L2 on worked numbers: training points (0,0), (10,0), (0,10); n = 3 nearest."""
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    judged = Judged()
    best = judged.add([0, 1], [7, 8], torch.tensor([[0.0, 0.0], [5.0, 0.0]]), train, n=3)
    # g0 = (0,0): distances 0, 10, 10, mean 20/3; g1 = (5,0): 5, 5, sqrt(125), mean (10 + 11.180) / 3
    mean1 = (10 + 125 ** 0.5) / 3
    assert best.tolist() == pytest.approx([0.0, 5 / mean1])
    closest = judged.per_image(3)
    assert closest[0] == [(0, 0.0), (1, pytest.approx(5 / mean1))]
    assert closest[1] == [(1, pytest.approx(5 / mean1)), (0, pytest.approx(1.5))]
    assert closest[2] == [(0, pytest.approx(1.5)), (1, pytest.approx(125 ** 0.5 / mean1))]
    assert judged.seed == [7, 8] and len(judged) == 2


def test_the_threshold_is_the_conformal_quantile_of_the_held_out_scores():
    """k = floor(alpha (n + 1)): a new unseen image falls below the k-th smallest of n with chance k / (n + 1)."""
    scores = torch.linspace(0.01, 1.0, 100)
    assert calibrated_threshold(scores, alpha=0.05) == pytest.approx(0.05)  # k = floor(5.05) = 5: 5 / 101 <= 0.05
    assert int((scores < calibrated_threshold(scores, 0.05)).sum()) == 4
    # fpr 0.05 over 100 prompts x K = 4 for 100 images: 1.25% a generation; k = floor(1.2625) = 1
    alpha = generation_rate(0.05, images=100, prompts=100, generations_per_prompt=4)
    assert alpha == pytest.approx(0.0125) and calibrated_threshold(scores, alpha) == pytest.approx(0.01)
    assert generation_rate(0.05, 100, 125, 4) == pytest.approx(0.01)  # extra prompts: more chances, a stricter rate
    with pytest.raises(LetheError, match="100 held-out images cannot calibrate"):
        calibrated_threshold(scores, alpha=0.005)  # k = 0: too few to say


def test_screen_mode_takes_the_top_share_and_a_random_sample_of_the_rest():
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.4, 0.5, 0.6])
    top, drawn = select(scores, generate_share=0.3, random_share=0.5, seed=0)
    assert top.tolist() == [1, 3, 5]  # the three highest
    assert len(drawn) == 4 and not set(drawn) & set(top)  # ceil(0.5 x 7) of the rest
    assert select(scores, 0.3, 0.5, seed=0)[1].tolist() == drawn.tolist()  # the seed decides


def test_the_reproduced_share_counts_what_was_found_and_estimates_what_was_missed():
    reproduced = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    full = reproduced_share(reproduced, None, None)  # 4 of 10, Clopper-Pearson interval
    assert full["audit/reproduced_share"] == 0.4
    assert (full["audit/reproduced_share/ci_low"], full["audit/reproduced_share/ci_high"]) == pytest.approx((0.1216, 0.7376), abs=1e-4)
    # screen: images 0-2 screened in (3 found); 6 and 7 sampled from the rest (1 of 2); 3, 4, 5, 8, 9 neither
    screen = reproduced_share(reproduced, np.array([0, 1, 2]), np.array([6, 7]))
    assert screen["audit/missed_estimate"] == pytest.approx(2.5)
    assert screen["audit/reproduced_share"] == pytest.approx((4 + 2.5) / 10)
    assert (screen["audit/missed_estimate/ci_low"], screen["audit/missed_estimate/ci_high"]) == pytest.approx(
        (5 * 0.01258, 5 * 0.98742), abs=1e-4)
    # image 9, never screened nor sampled, copied by another prompt's generation: found, not estimated
    reproduced[9] = True
    found_anyway = reproduced_share(reproduced, np.array([0, 1, 2]), np.array([6, 7]))
    assert found_anyway["audit/missed_estimate"] == pytest.approx(2.0)
    assert found_anyway["audit/reproduced_share"] == pytest.approx((5 + 2.0) / 10)
    assert found_anyway["audit/reproduced_share/ci_low"] >= 0.5  # never below what was found
    # no random sample: nothing known of the 5 others (3, 4, 5, 7, 8)
    blind = reproduced_share(reproduced, np.array([0, 1, 2]), np.array([], dtype=int))
    assert np.isnan(blind["audit/missed_estimate"]) and blind["audit/missed_estimate/ci_high"] == 5


# ------------------------------------------------------------------------- a model a user brings


def image_folder(folder: Path, n: int, seed: int, captions=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(n):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8), "RGB").save(folder / f"{i:02d}.png")
            text = captions[i] if captions else f"a picture number {i} of {seed}"
            handle.write(json.dumps({"file_name": f"{i:02d}.png", "text": text}) + "\n")
    return folder


def lora_weights(base: Path, out: Path, cross_attention_dim: int = 32) -> Path:
    """LoRA weights as diffusers' LoRA training script saves them (peft layers, then save_lora_weights)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if cross_attention_dim == 32:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    else:  # a base model of another shape: its LoRA does not fit ours
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                    cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(3)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:  # trained LoRA weights are not zero
            torch.nn.init.normal_(parameter, std=0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture
def brought(project):
    sd = build_tiny_sd(project / "sd")
    write_params(project / "params.yaml", SD_PRESET, sample={"steps": 2, "batch_size": 4, "guidance_scale": 3.0},
                 evaluate={"rel_l2_n": 4},
                 audit={"generations_per_prompt": 2, "screen_seeds": 1, "generate_share": 0.5, "random_share": 0.5, "shown": 3,
                        "fpr": 0.5})  # 8 held-out images calibrate a rate of 0.5 x 6 / (8 x 2) = 0.19, no lower
    return {"sd": sd, "lora": lora_weights(sd, project / "lora"), "images": image_folder(project / "train", 6, seed=1),
            "holdout": image_folder(project / "held", 8, seed=2)}


def test_lora_weights_load_through_diffusers_and_are_fused(brought):
    """Fused into the U-Net, the LoRA gives what diffusers' own (unfused) LoRA layers compute."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from lethe.models.brought import load_brought_model

    plain = load_brought_model(brought["sd"]).unet
    fused = load_brought_model(brought["sd"], brought["lora"]).unet
    reference = UNet2DConditionModel.from_pretrained(brought["sd"], subfolder="unet")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(brought["lora"]))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, reference)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        want, got, before = (m(x, 10, encoder_hidden_states=c).sample for m in (reference, fused, plain))
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - before).abs().max() > 1e-2  # the LoRA changed the model
    assert not any("lora" in name for name, _ in fused.named_parameters())  # plain layers: full speed


def test_audit_of_a_pipeline_with_lora_on_an_image_folder(project, brought, capsys):
    prompts = project / "prompts.txt"
    prompts.write_text("a short prompt\n\nanother one\n")
    args = ["audit", "--model", str(brought["sd"]), "--lora", str(brought["lora"]), "--images", str(brought["images"]),
            "--holdout", str(brought["holdout"]), "--prompts", str(prompts), "--name", "mine"]
    assert main(args) == 0
    log = capsys.readouterr().err
    assert "audit: screen" in log and "audit: generate" in log  # progress, one line per redraw in a log
    assert "\r" not in log

    audit = json.loads((project / "reports/audit/mine/audit.json").read_text())
    metrics = audit["metrics"]
    assert [e["file_name"] for e in audit["training_images"]] == [f"{i:02d}.png" for i in range(6)]
    assert {p["prompt"] for p in audit["prompts"] if p["source"] == "extra"} == {"a short prompt", "another one"}
    # 8 prompts: the top half (4) and half the rest (2) generated, each at most K = 2 times
    assert metrics["audit/prompts"] == 8 and metrics["audit/prompts_generated"] == 6
    assert metrics["audit/generations"] == sum(p["generations"] for p in audit["prompts"]) <= 12
    assert metrics["audit/threshold_calibrated"] == 1 and metrics["audit/holdout_images"] == 8
    for entry in audit["training_images"]:
        assert entry["reproduced"] == (entry["risk"] > 1 - metrics["audit/threshold"])
        assert len(entry["closest"]) <= 3 and all(c["prompt"] for c in entry["closest"])
    assert metrics["audit/reproduced_share/ci_low"] <= metrics["audit/reproduced_share"] <= metrics["audit/reproduced_share/ci_high"]

    page = (project / "reports/audit/mine/index.html").read_text()
    assert "training images reproduced" in page and page.count("alt='training image'") == 3
    assert "data:image/png;base64," in page and "histogram of risk scores" in page
    assert json.loads((project / "reports/audit/mine.json").read_text()) == metrics

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'audit@mine'").iloc[0]
    assert run["metrics.audit/generations"] == metrics["audit/generations"]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "audit")]
    assert "audit/index.html" in artifacts and "audit/audit.json" in artifacts


def test_a_killed_audit_resumes_from_its_completed_batches(project, brought, monkeypatch):
    import lethe.sampling

    real, calls = lethe.sampling.generate, []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the audit is killed while generating its second batch
        calls.append(1)
        return real(*args, **kwargs)

    args = ["audit", "--model", str(brought["sd"]), "--images", str(brought["images"]), "--name", "resumed", "--full"]
    monkeypatch.setattr(lethe.sampling, "generate", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (project / "reports/audit/resumed").exists()  # nothing half-written

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(lethe.sampling, "generate", counted)
    assert main(args) == 0
    # full mode: 6 prompts x K = 2 in batches of 4 -> 2 rounds of 2 batches; the first was kept
    assert len(calls) == 3
    assert json.loads((project / "reports/audit/resumed.json").read_text())["audit/generations"] == 12


def test_without_held_out_images_the_published_threshold_applies_and_the_page_says_so(project, brought):
    assert main(["audit", "--model", str(brought["sd"]), "--images", str(brought["images"]), "--name", "plain"]) == 0
    metrics = json.loads((project / "reports/audit/plain.json").read_text())
    assert metrics["audit/threshold_calibrated"] == 0 and metrics["audit/threshold"] == 0.5  # the preset's rel_l2_threshold
    assert "false-positive rate on these images is unknown" in (project / "reports/audit/plain/index.html").read_text()


# ---------------------------------------------------------------------------------------- bad input


def lethe_model(path: Path, words: list[str]) -> Path:
    from lethe.config import ModelConfig
    from lethe.models.diffusion_model import build_model, save_model
    from lethe.models.text import corpus_vocabulary

    save_model(build_model(ModelConfig(), 16, 1, corpus_vocabulary(words)), path)
    return path


@pytest.mark.parametrize("case", ["wrong kind of model", "lora of another model", "no such folder", "unknown words"])
def test_bad_input_is_one_line_naming_the_file_and_exit_2(project, brought, capsys, case):
    if case == "wrong kind of model":
        (project / "weird").mkdir()
        (project / "weird" / "model.bin").write_bytes(b"\0")
        args, named = ["--model", str(project / "weird"), "--images", str(brought["images"])], project / "weird"
    elif case == "lora of another model":
        other = lora_weights(brought["sd"], project / "other", cross_attention_dim=48)
        args, named = ["--model", str(brought["sd"]), "--lora", str(other), "--images", str(brought["images"])], other
    elif case == "no such folder":
        args, named = ["--model", str(brought["sd"]), "--images", str(project / "nowhere")], project / "nowhere"
    else:
        model = lethe_model(project / "digits-model", ["a handwritten digit seven"])
        folder = image_folder(project / "words", 3, seed=4, captions=["purple elephant"] * 3)
        args, named = ["--model", str(model), "--images", str(folder)], folder / "metadata.jsonl"
    capsys.readouterr()
    assert main(["audit", *args, "--name", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err, err
    assert not (project / "reports/audit/bad").exists()
