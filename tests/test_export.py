"""`lethe export`: variants of the tiny random Stable Diffusion written in diffusers' formats, loaded in a fresh
process by diffusers alone, generate what lethe's sampler generates from the same starting latents.

The baseline and MemControl's LoRA are trained by lethe's own stages (prepare, pretrain, train) on a folder
of images, the text encoder fine-tuned with the U-Net; MemAttn's steering and Wen's embedding optimisation
are packaged on the trained baseline. The checkpoint's scheduler has Stable Diffusion 1.5's settings;
`random_caption` stands for a model on a checkpoint whose DDIM settings (steps_offset 0, clip_sample on: the
tiny checkpoint's own) a stock StableDiffusionPipeline would rewrite.
One subprocess loads every export.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lethe.cli import main
from lethe.config import load_params
from lethe.models.random_sd import write_image_folder
from tests.conftest import SMOKE
from tests.test_scale import SD_PRESET, write_params
from tests.tiny_sd import build_tiny_sd

PROMPTS = ["a red square", "a blue ring number 3"]
SEEDS = [0, 1]
STEPS, GUIDANCE = 3, 3.0
VARIANTS = ("baseline", "memcontrol", "memattn", "wen_inference", "random_caption")
TOLERANCE = 1e-4  # max |difference| of images in [0, 1]; measured 0 (bit-equal) here, 4.5e-7 for the unfused LoRA
MEMATTN = {"begin_scale": 3.0, "mask_padding": True}
WEN = {"lr": 0.05, "iterations": 3, "target": 1e-3}  # a target no prompt reaches: all three steps run

# runs in a fresh interpreter: diffusers only, never lethe
LOADER = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

root = sys.argv[1]
inputs = load_file(f"{root}/latents.safetensors")
prompts, steps, guidance = json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def images(pipe):
    return pipe(prompts, latents=inputs["latents"], num_inference_steps=steps, guidance_scale=guidance,
                output_type="pt").images

out, notes = {}, {}
out["baseline"] = images(StableDiffusionPipeline.from_pretrained(f"{root}/out/baseline"))
lora = StableDiffusionPipeline.from_pretrained(f"{root}/out/memcontrol")
out["lora_base"] = images(lora)
lora.load_lora_weights(f"{root}/out/memcontrol")
out["memcontrol"] = images(lora)
out["fused"] = images(StableDiffusionPipeline.from_pretrained(f"{root}/out/fused"))
for name in ("memattn", "wen_inference", "random_caption"):
    pipe = DiffusionPipeline.from_pretrained(f"{root}/out/{name}", trust_remote_code=True)
    notes[name] = type(pipe).__name__
    out[name] = images(pipe)
for name in ("memattn", "random_caption"):
    try:
        StableDiffusionPipeline.from_pretrained(f"{root}/out/{name}")
        notes[f"stock_{name}"] = "loaded"
    except Exception as exc:
        notes[f"stock_{name}"] = f"{type(exc).__name__}: {exc}"
notes["lethe_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "lethe")
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/diffusers.safetensors")
print(json.dumps(notes))
"""


def perturbed(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def make_variants(params, old_sd: Path) -> None:
    """models/pretrained, baseline and memcontrol trained by lethe's own stages; memattn and wen_inference
    packaged from the trained baseline; loyal (a RAU-Net, refused) and random_caption on `old_sd`."""
    from lethe.models.diffusion_model import add_raunet, build_model, load_model, save_model
    from lethe.training.peft_masks import transformer_blocks

    for stage in (["prepare"], ["pretrain"], ["train", "baseline"]):
        assert main(stage) == 0, stage
    blocks = transformer_blocks(load_model("models/pretrained").unet)[:1]
    # the MemControl search's choice (the search is not what is tested): a rank-2 LoRA with alpha/r = 2
    Path("search").mkdir()
    Path("search/memcontrol.json").write_text(json.dumps({"family": "lora", "blocks": blocks, "lora_rank": 2,
                                                          "lora_alpha": 4.0, "lr": 0.05}))
    assert main(["train", "memcontrol"]) == 0
    baseline = load_model("models/baseline")
    for name, settings in (("memattn", MEMATTN), ("wen_inference", WEN)):
        baseline.spec.inference = {name: settings}
        save_model(baseline, f"models/{name}")
    loyal = load_model("models/pretrained")
    add_raunet(loyal, "conv", levels=(1,), tau=500)
    save_model(loyal, "models/loyal")
    torch.manual_seed(0)
    other = build_model(params.model.model_copy(update={"pretrained_path": str(old_sd)}), 16, 3)
    perturbed(other.unet, 0.02)
    save_model(other, "models/random_caption")


def sd15_scheduler(sd: Path) -> Path:
    """The checkpoint with Stable Diffusion 1.5's scheduler settings (which a stock pipeline keeps)."""
    path = sd / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}))
    return sd


def lethe_images(params, variant: str) -> torch.Tensor:
    from lethe.models.diffusion_model import build_scheduler, load_model
    from lethe.sampling import generate

    model = load_model(f"models/{variant}")
    return (generate(model, build_scheduler(model, params.diffusion), PROMPTS, SEEDS, params.sample) + 1) / 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every export written by `lethe export`, and what diffusers alone generates from each in a subprocess."""
    from lethe.sampling import initial_noise

    root = tmp_path_factory.mktemp("export")
    cwd, saved = os.getcwd(), {k: os.environ.pop(k, None) for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    os.chdir(root)
    try:
        sd = sd15_scheduler(build_tiny_sd(root / "sd"))
        small = {"batch_size": 4, "accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
                 "gradient_checkpointing": False}
        # the fine-tune trains the text encoder too, so that a trained one travels with the export
        write_params(root / "params.yaml", SD_PRESET, model={"pretrained_path": str(sd)},
                     data={"folder": str(write_image_folder(root / "images")), "resolution": 16, "target_size": 8,
                           "holdout_size": 4, "tune_size": 4},
                     pretrain=small, finetune={**small, "steps": 6, "warmup_steps": 1, "lr": 0.01,
                                               "train_text_encoder": True},
                     sample={"steps": STEPS, "guidance_scale": GUIDANCE, "batch_size": 4},
                     registry={"model_name": "tiny"}, tracking={"experiment": "tiny"})
        params = load_params(root / "params.yaml")
        make_variants(params, build_tiny_sd(root / "sd_old"))
        codes = {v: main(["export", v, "--to", f"out/{v}"]) for v in VARIANTS}
        codes["fused"] = main(["export", "memcontrol", "--to", "out/fused", "--fuse"])
        save_file({"latents": initial_noise((4, 8, 8), SEEDS)}, root / "latents.safetensors")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
            "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "hf_modules")}
        run = subprocess.run([sys.executable, "-c", LOADER, str(root), json.dumps(PROMPTS), str(STEPS), str(GUIDANCE)],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        lethe = {v: lethe_images(params, v) for v in VARIANTS}
        yield {"root": root, "codes": codes, "notes": json.loads(run.stdout.strip().splitlines()[-1]), "lethe": lethe,
               "diffusers": load_file(root / "diffusers.safetensors"), "params": params}
    finally:
        os.chdir(cwd)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def test_every_export_succeeds_and_loads_without_lethe(exported):
    assert set(exported["codes"].values()) == {0}
    assert exported["notes"]["lethe_modules"] == []
    assert {exported["notes"][v] for v in ("memattn", "wen_inference", "random_caption")} == {"LetheMitigatedPipeline"}


@pytest.mark.parametrize("variant, loaded", [("baseline", "baseline"), ("memcontrol", "memcontrol"),
                                             ("memcontrol", "fused"), ("memattn", "memattn"),
                                             ("wen_inference", "wen_inference"),
                                             ("random_caption", "random_caption")])
def test_diffusers_generates_what_lethe_generates(exported, variant, loaded):
    want, got = exported["lethe"][variant], exported["diffusers"][loaded]
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert (got - want).abs().max() <= TOLERANCE


@pytest.mark.parametrize("mitigated, plain", [("memattn", "baseline"), ("wen_inference", "baseline"),
                                              ("memcontrol", "lora_base")])
def test_the_mitigation_or_the_lora_changes_the_images(exported, mitigated, plain):
    """Each would pass the equality above without its mitigation if it changed nothing: it does change them,
    by ten times the tolerance at least (MemAttn's steering moves the trained tiny model's images by ~2e-3:
    its random text path carries little of the image)."""
    images = exported["diffusers"]
    assert (images[mitigated] - images[plain]).abs().max() > 10 * TOLERANCE


@pytest.mark.parametrize("name", ["memattn", "random_caption"])
def test_a_stock_pipeline_refuses_an_export_it_would_sample_differently(exported, name):
    """Loaded as a plain StableDiffusionPipeline, MemAttn's steering or the saved DDIM settings would be lost."""
    assert "trust_remote_code" in exported["notes"][f"stock_{name}"]


def test_the_kept_scheduler_settings_are_recorded(exported):
    root = exported["root"]
    record = json.loads((root / "out/random_caption/lethe.json").read_text())
    assert record["scheduler_kept"] == {"steps_offset": 0, "clip_sample": True} and record["pipeline"] == "pipeline.py"
    assert json.loads((root / "out/random_caption/model_index.json").read_text())["mitigations"] == {}
    assert json.loads((root / "out/baseline/lethe.json").read_text())["pipeline"] is None
    assert not (root / "out/baseline/pipeline.py").exists()


def test_the_export_records_its_origin_and_the_sampler(exported):
    root, params = exported["root"], exported["params"]
    import hashlib

    record = json.loads((root / "out/memattn/lethe.json").read_text())
    assert record["variant"] == "memattn" and record["registry"] is None
    assert record["params_sha256"] == hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()
    assert record["sampling"] == {"scheduler": "DDIMScheduler", "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
                                  "precision": "32-true"}
    assert record["mitigations"] == {"memattn": MEMATTN} and record["pipeline"] == "pipeline.py"
    index = json.loads((root / "out/memattn/model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LetheMitigatedPipeline"] and index["mitigations"] == {"memattn": MEMATTN}
    source = (root / "out/memattn/pipeline.py").read_text()
    assert not re.search(r"^\s*(from|import) lethe\b", source, re.MULTILINE)  # diffusers alone loads it
    assert "def optimise_prompt_embedding" in source and "class CrossAttentionProcessor" in source
    scheduler = json.loads((root / "out/baseline/scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_schedule"] == "scaled_linear"

    lora = json.loads((root / "out/memcontrol/lethe.json").read_text())
    assert lora["lora"] == "pytorch_lora_weights.safetensors" and not lora["fused"]
    weights = load_file(root / "out/memcontrol/pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in weights)
    assert all(v.shape[0] == 2 for k, v in weights.items() if ".lora.down." in k)  # rank 2
    assert not (root / "out/fused/pytorch_lora_weights.safetensors").exists()
    # the LoRA export's U-Net is the base's; the fused one is MemControl's own
    base = load_file(root / "out/memcontrol/unet/diffusion_pytorch_model.safetensors")
    fused = load_file(root / "out/fused/unet/diffusion_pytorch_model.safetensors")
    key = next(k for k in base if k.endswith("attn1.to_q.weight") and "down_blocks.1" in k)
    assert not torch.equal(base[key], fused[key])


def test_champion_is_resolved_through_the_registry_and_knows_its_export(exported, monkeypatch):
    import mlflow

    from lethe.pyfunc import log_pyfunc
    from lethe.tracking import connect

    root, params = exported["root"], exported["params"]
    monkeypatch.chdir(root)
    connect(params.tracking)
    with mlflow.start_run():
        info = log_pyfunc("memattn", Path("models/memattn"), params, "tiny")
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag("tiny", version, "method", "memattn")
    client.set_model_version_tag("tiny", version, "metric/replication/rate/dup", "0.25")
    client.set_registered_model_alias("tiny", "champion", version)

    assert main(["export", "champion", "--to", "champ"]) == 0
    record = json.loads((root / "champ/lethe.json").read_text())
    assert record["registry"] == {"model": "tiny", "version": version, "alias": "champion",
                                  "metrics": {"replication/rate/dup": 0.25}}
    assert record["variant"] == "memattn" and record["mitigations"] == {"memattn": MEMATTN}
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "pipeline.py"):
        assert (root / "champ" / part).read_bytes() == (root / "out/memattn" / part).read_bytes(), part
    tags = client.get_model_version("tiny", version).tags
    assert tags["export/path"] == str((root / "champ").resolve())
    import diffusers

    assert tags["export/diffusers_version"] == diffusers.__version__


BAD = {
    "unknown variant": (["nonesuch", "--to", "bad"], "nonesuch: not a variant"),
    "unknown alias": (["models:/tiny@nosuch", "--to", "bad"], "models:/tiny@nosuch: no such registered model or alias"),
    "existing --to": (["baseline", "--to", "out/baseline"], "already exists and is not empty"),
    "RAU-Net": (["loyal", "--to", "bad"], "loyal: RAU-Net (LoyalDiffusion) is not exported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_refusals_and_bad_input_are_one_line_and_exit_2(exported, monkeypatch, capsys, case):
    args, message = BAD[case]
    monkeypatch.chdir(exported["root"])
    before = sorted(p.name for p in Path("out").iterdir())
    capsys.readouterr()
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not Path("bad").exists() and not list(Path(".").glob(".bad.*"))  # nothing half-written
    assert sorted(p.name for p in Path("out").iterdir()) == before


def test_an_embedded_model_is_refused_in_one_line(tmp_path, monkeypatch, capsys, tiny_model):
    from lethe.models.diffusion_model import save_model

    import shutil

    shutil.copy(SMOKE, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    save_model(tiny_model, "models/baseline")
    capsys.readouterr()
    assert main(["export", "baseline", "--to", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "baseline: embedded models are not exported" in err, err
    assert not Path("out").exists()
