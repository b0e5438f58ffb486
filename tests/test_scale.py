"""Full scale on this CPU: the latent path on a tiny Stable-Diffusion-shaped checkpoint, local SSCD and
open_clip files, DDP over two gloo processes, and an MLflow tracking server in a subprocess.

No GPU here: mixed precision runs as bf16 autocast on the CPU; fp16, NCCL and FSDP (GPU-only in
Lightning) are not exercised. Tests marked `slow` start subprocesses and take up to about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lethe.cli import main
from lethe.config import TrainConfig, load_params
from lethe.errors import LetheError
from lethe.methods import CANDIDATES, INFERENCE, METHODS, MITIGATE, VARIANTS
from lethe.models.random_sd import write_image_folder
from lethe.memorization.features import IMAGENET_MEAN, IMAGENET_STD, _rgb, load_features
from tests.conftest import ROOT, SMOKE
from tests.tiny_sd import build_tiny_sd

SD_PRESET = ROOT / "pipelines" / "stable-diffusion" / "params.yaml"
TINY_CLIP = "lethe-tiny-clip"


# ---------------------------------------------------------------------------------------------- helpers

def tiny_open_clip(tmp_path: Path) -> Path:
    """A tiny open_clip CLIP (registered as TINY_CLIP) with random weights saved to a safetensors file."""
    import open_clip

    config = tmp_path / f"{TINY_CLIP}.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_CLIP)
    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lethe(*args, cwd: Path, timeout: int = 300) -> str:
    """The `lethe` command in a fresh process, as DVC runs it (Lightning's DDP launcher re-runs it per rank)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    result = subprocess.run([str(Path(sys.executable).parent / "lethe"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"lethe {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def write_params(path: Path, base: Path, **sections) -> None:
    raw = yaml.safe_load(base.read_text())
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(raw))
    load_params(path)  # valid, or the test fails here


# ------------------------------------------------------------------------ local feature and CLIP files

def test_sscd_features_from_a_local_torchscript_file(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.manual_seed(0)
    scripted = torch.jit.script(net.eval())
    path = tmp_path / "sscd.torchscript.pt"
    scripted.save(str(path))
    features = load_features("sscd", str(path))
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    got = features(images)
    with torch.no_grad():
        expected = net(_rgb(images, 288, IMAGENET_MEAN, IMAGENET_STD))  # SSCD's input: 288 px, ImageNet-normalised
    assert got.shape == (5, 8) and torch.allclose(got, expected, atol=1e-6)
    assert features(torch.rand(1, 1, 16, 16) * 2 - 1).shape == (1, 8)  # greyscale images are expanded to RGB
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(LetheError, match="not a TorchScript file"):
        load_features("sscd", str(tmp_path / "junk.pt"))


def test_open_clip_features_and_clip_score_from_a_local_file(tmp_path):
    import open_clip

    from lethe.evaluation.clip_score import load_clip_score

    path = tiny_open_clip(tmp_path)
    reference = open_clip.create_model(TINY_CLIP)
    reference.load_state_dict(load_file(path))
    reference.eval()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    preprocessed = _rgb(images, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        expected = reference.encode_image(preprocessed)
        other = open_clip.create_model(TINY_CLIP).encode_image(preprocessed)  # fresh random weights
    got = load_features("open_clip", str(path), TINY_CLIP)(images)
    assert got.shape == (4, 16) and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-3)  # the file's weights were loaded, not random ones

    prompts = ["a red square", "a blue ring", "a green cross", "a cat"]
    score = load_clip_score(str(path), TINY_CLIP)(images, prompts)
    with torch.no_grad():
        text = reference.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    cosine = torch.nn.functional.cosine_similarity(expected, text, dim=-1)
    assert torch.allclose(score, (100 * cosine).clamp(min=0), atol=1e-3)
    assert (score >= 0).all() and (score <= 100).all() and score.max() > 0
    with pytest.raises(LetheError, match="clip_model_path"):
        load_clip_score(str(tmp_path / "missing.safetensors"), TINY_CLIP)


# ------------------------------------------------------------------------------ scale-out params

def test_scale_out_params_are_checked():
    with pytest.raises(ValueError, match="divide evenly over devices x num_nodes = 6"):
        TrainConfig(batch_size=32, devices=3, num_nodes=2)
    with pytest.raises(ValueError, match="set ema_decay: 0"):
        TrainConfig(strategy="fsdp", ema_decay=0.99)
    assert TrainConfig(batch_size=32, devices=4, num_nodes=2, strategy="ddp").num_nodes == 2
    sd = load_params(SD_PRESET)
    assert sd.model.kind == "latent" and sd.finetune.precision == "bf16-mixed"
    assert sd.finetune.gradient_checkpointing and not sd.finetune.train_text_encoder and sd.pretrain.steps == 0


def test_bad_strategy_is_one_line_and_exit_2(project, capsys):
    write_params(project / "params.yaml", SMOKE, pretrain={"strategy": "warp_drive"})
    assert main(["prepare"]) == 0
    assert main(["pretrain"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow" not in line]  # MLflow's INFO lines
    assert len(err) == 1 and err[0].startswith("lethe: error: training params (strategy 'warp_drive'")


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    from lethe.training.fit import StepBatches

    pool = lambda step: np.arange(50)  # noqa: E731
    whole = list(StepBatches(pool, steps=4, batch_size=8, seed=3))
    halves = [list(StepBatches(pool, 4, 8, 3, shard=lambda r=r: (2, r))) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole
    assert all(len(batch) == 4 for batch in halves[0])
    with pytest.raises(LetheError, match="does not split evenly over 3"):
        next(iter(StepBatches(pool, 4, 8, 3, shard=lambda: (3, 0))))


# ----------------------------------------------------------------------------- the latent path

def test_latents_are_cached_once_and_training_never_runs_the_encoder(tmp_path, monkeypatch):
    from lethe.data.latents import cached_latents
    from lethe.data.sources import prepare
    from lethe.config import DataConfig, ModelConfig
    from lethe.models.diffusion_model import build_model, build_scheduler
    from lethe.training.fit import CaptionedImages, enable_gradient_checkpointing, fit
    from lethe.training.module import DiffusionTraining

    monkeypatch.chdir(tmp_path)
    data = prepare(DataConfig(source="folder", folder=str(write_image_folder(tmp_path / "images", n=12)),
                              channels=3, target_size=6, holdout_size=3, dup_share=0.0))
    model = build_model(ModelConfig(kind="latent", pretrained_path=str(build_tiny_sd(tmp_path / "sd"))), 16, 3)
    encoder_calls = []
    model.vae.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    latents = cached_latents(model, data, "data-hash-1", torch.device("cpu"))
    with torch.no_grad():
        expected = model.vae.encode(data.tensor(range(12))).latent_dist.mean * model.vae.config.scaling_factor
    assert latents.shape == (12, 4, 8, 8) and torch.allclose(latents, expected, atol=1e-5)
    files = list(Path(".lethe/latents").glob("*.safetensors"))
    assert len(files) == 1
    encoder_calls.clear()
    assert torch.equal(cached_latents(model, data, "data-hash-1", torch.device("cpu")), latents)
    assert not encoder_calls  # read back, not re-encoded
    cached_latents(model, data, "data-hash-2", torch.device("cpu"))  # other data: another entry
    assert len(list(Path(".lethe/latents").glob("*.safetensors"))) == 2

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, accelerator="cpu", devices=1, precision="bf16-mixed",
                      gradient_checkpointing=True, train_text_encoder=False, checkpoint_every=100)
    module = DiffusionTraining(model, build_scheduler(model, None), cfg)
    records = data.training_records("target")
    dataset = CaptionedImages(data, records, model.text_encoder.tokenize, latents=latents)
    assert set(dataset[0]) == {"latents", "ids", "index", "step"}
    before = model.unet.conv_in.weight.detach().clone()
    encoder_calls.clear()
    result = fit(module, dataset, cfg, tmp_path / "ckpt")
    assert result.steps == 2 and result.is_main
    assert not encoder_calls  # training read the cached latents
    assert model.unet.is_gradient_checkpointing and enable_gradient_checkpointing(module) == 1
    assert not torch.equal(before, model.unet.conv_in.weight)



def sd_scale_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_scale", ROOT / "benchmarks" / "sd_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd_scale_benchmark_skips_without_a_gpu_and_runs_the_preset_path_at_toy_size(monkeypatch, capsys):
    """benchmarks/sd_scale.py is run on a GPU when one is lent; here its skip and, at toy size on the CPU,
    the code it times: the preset's bf16-mixed training with gradient checkpointing, then generation."""
    bench = sd_scale_benchmark()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["sd_scale.py"])
    assert bench.main() == 0
    assert "skipped" in json.loads(capsys.readouterr().out)

    monkeypatch.setattr(sys, "argv", ["sd_scale.py", "--tiny", "--device", "cpu", "--steps", "3", "--warmup", "1",
                                      "--batch-size", "2", "--images", "16", "--generations", "2",
                                      "--sample-steps", "2", "--resolution", "16"])
    assert bench.main() == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["size"] == "tiny" and result["precision"] == "bf16-mixed" and result["gradient_checkpointing"]
    assert result["timed_steps"] == 2 and result["train_steps_per_s"] > 0
    assert result["generations"] == 2 and result["seconds_per_image"] > 0 and result["sample_steps"] == 2

# Every stage of dvc.yaml, in an order DVC may run them (test_pipeline_order_covers_dvc_yaml checks both)
PIPELINE = [
    ["prepare"], ["featurizer"], ["pretrain"], ["calibrate"], ["shard"],
    ["train", "baseline"], ["select_loyal"], *(["train", m] for m in METHODS if m not in ("baseline", "memcontrol")),
    ["detect"], *(["mitigate", v] for v in MITIGATE), ["localize"], ["memcontrol"],
    ["train", "memcontrol"],
    *(["evaluate", v] for v in VARIANTS),
    ["report"], ["register"], ["audit", "baseline"], ["audit", "champion"],
]


def dvc_stage_names() -> set[str]:
    """dvc.yaml's stages with each `foreach` expanded, as `dvc repro` names them."""
    names = set()
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        keys = stage.get("foreach")
        names |= {f"{name}@{key}" for key in keys} if keys else {name}
    return names


def test_pipeline_order_covers_dvc_yaml():
    names = ["@".join(stage) for stage in PIPELINE]
    assert sorted(names) == sorted(dvc_stage_names())
    position = {name: i for i, name in enumerate(names)}
    for variant in VARIANTS:
        made_by = f"train@{variant}" if variant in METHODS else (
            "localize" if INFERENCE[variant].stage == "localize" else f"mitigate@{variant}")
        assert position[made_by] < position[f"evaluate@{variant}"], variant
    assert position["memcontrol"] < position["train@memcontrol"]
    assert position["train@baseline"] < position["select_loyal"] < min(position["train@loyal"], position["train@raunet"])
    assert position["detect"] < position["mitigate@wen_inference"] < position["report"] < position["register"]
    assert position["calibrate"] < position["detect"] and position["evaluate@baseline"] == min(
        position[f"evaluate@{v}"] for v in VARIANTS)  # every variant is paired with the baseline's outcomes


@pytest.mark.slow
def test_whole_pipeline_on_a_tiny_stable_diffusion_checkpoint(project):
    """Every stage on the SD preset with a tiny random SD-shaped checkpoint and an image folder: the latent
    path through training, mitigations, detection, localization, the MemControl search and the registry.
    The folder has no copies and planting is off on a folder: every stage runs and says there is no dup
    group instead of inventing one."""
    sd = build_tiny_sd(project / "sd")
    clip = tiny_open_clip(project)
    folder = write_image_folder(project / "images")
    small = {"batch_size": 4, "accelerator": "cpu", "devices": 1, "strategy": "auto", "checkpoint_every": 100,
             # bf16 autocast and gradient checkpointing are the preset's; bf16 is emulated (slow) on this CPU
             # and is exercised by test_latents_are_cached_once_and_training_never_runs_the_encoder
             "precision": "32-true", "gradient_checkpointing": False}
    write_params(
        project / "params.yaml", SD_PRESET,
        data={"folder": str(folder), "resolution": 16, "target_size": 8, "holdout_size": 4, "tune_size": 4},
        model={"pretrained_path": str(sd)},
        pretrain=small,
        finetune={**small, "steps": 4, "warmup_steps": 1, "ema_decay": 0.9},
        sample={"steps": 2, "batch_size": 16, "grid_size": 3},
        probe={"prompts_per_group": 2, "seeds_per_prompt": 1},
        ietagc={"shards": 2, "local_steps": 1},
        detect={"prompts_per_group": 2, "generations_per_prompt": 2, "nemo_seeds": 2},
        wen_inference={"iterations": 2},
        nemo={"holdout_prompts": 3, "max_prompts": 2, "seeds": 2, "iterations": 3, "batch_size": 4},
        memcontrol={"n_trials": 2, "population_size": 2, "trial_steps": 2, "fd_prompts": 4, "sample_steps": 2,
                    "magnitude_draws": 2},
        audit={"generations_per_prompt": 2, "screen_seeds": 1, "fpr": 0.5},  # 4 held-out images: a rate of 0.25, no lower
        evaluate={"prompts_per_group": 2, "generations_per_prompt": 2, "features": "open_clip",
                  "features_path": str(clip), "open_clip_model": TINY_CLIP, "clip_model_path": str(clip),
                  "rel_l2_n": 4, "gallery_rows": 2},
    )
    for stage in PIPELINE:
        assert main(list(stage)) == 0, stage

    assert json.loads((project / "metrics/train/pretrained.json").read_text())["train/samples_seen"] == 0
    pretrained = load_file(project / "models/pretrained/weights.safetensors")
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(sd / "unet").state_dict()
    assert torch.equal(pretrained["unet.conv_in.weight"], original["conv_in.weight"])  # steps 0: the checkpoint
    tuned = load_file(project / "models/baseline/weights.safetensors")
    assert all(k.startswith("unet.") for k in tuned)  # frozen VAE and CLIP text encoder are not saved
    assert not torch.equal(tuned["unet.conv_in.weight"], original["conv_in.weight"])
    assert len(list((project / ".lethe/latents").glob("*.safetensors"))) == 1

    assert json.loads((project / "metrics/data.json").read_text())["data/dup_prompts"] == 0
    for variant in VARIANTS:
        metrics = json.loads((project / f"metrics/{variant}.json").read_text())
        assert metrics["prompts/dup"] == 0 and "replication/rate/dup" not in metrics
        for group in ("unique", "holdout"):
            assert 0 <= metrics[f"quality/clip_score/{group}"] <= 100, variant  # a random tiny CLIP: often 0
            assert 0 <= metrics[f"replication/rate/{group}"] <= 1, variant
            assert np.isfinite(metrics[f"quality/fd/{group}"]), variant  # in open_clip's space: no featurizer
            assert f"quality/prompt_accuracy/{group}" not in metrics  # no labels in an image folder
        assert (project / f"reports/evaluate/{variant}/gallery.png").exists()
    baseline = json.loads((project / "metrics/baseline.json").read_text())
    assert max(baseline[f"quality/clip_score/{g}"] for g in ("unique", "holdout")) > 0

    detect = json.loads((project / "metrics/detect.json").read_text())
    assert detect["prompts/dup"] == 0 and detect["detection/wen_first/planted_auroc"] is None  # no dup group
    localized = json.loads((project / "metrics/localize.json").read_text())
    nemo = json.loads((project / "models/nemo/config.json").read_text())["nemo"]
    assert len(nemo["neurons"]) == localized["nemo/union_neurons"]
    chosen = json.loads((project / "search/memcontrol.json").read_text())
    trained = json.loads((project / "metrics/train/memcontrol.json").read_text())
    assert chosen["blocks"] and trained["cost/trainable_params"] == chosen["trainable_params"]
    assert chosen["memorization_subset"] == "target (no tune dup pictures: shared with judging)"
    report = (project / "reports/report.md").read_text()
    assert all(f"| {v} |" in report for v in VARIANTS) and "There is no dup group" in report
    registry = json.loads((project / "reports/registry.json").read_text())
    assert set(registry["versions"]) == set(CANDIDATES)  # the A/A replicates are not registered
    assert registry["aliases"]["champion"] == registry["aliases"]["baseline"]  # nothing to reduce: baseline stays
    # no dup group: no re-identification change to judge, which refuses, naming it
    assert "missing or not finite: vs_baseline/replication_reid_rate_dup/diff" in registry["policy"]["loyal"]
    audited = json.loads((project / "reports/audit/champion/audit.json").read_text())
    assert audited["variant"] == "baseline" and audited["mode"] == "screen"  # the champion: the baseline here
    assert len(audited["training_images"]) == audited["metrics"]["audit/images"] > 0
    assert "audit/planted_recall" not in audited["metrics"]  # nothing planted on a folder


# ----------------------------------------------------------------------------------- DDP on CPU

DDP_TOLERANCE = 1e-4  # max |weight difference| after 6 AdamW steps; see the test's docstring


@pytest.mark.slow
def test_ddp_on_two_processes_trains_what_one_process_trains(tmp_path, monkeypatch):
    """Two gloo processes with 4 samples each train the model one process trains with a batch of 8.

    The same global batch (each rank takes its contiguous half of the batch drawn for the step), the
    same noise, timesteps and caption dropout (every rank draws them for the whole global batch from
    the same seeded stream and keeps its rows), the same initial weights (seeded; DDP broadcasts rank
    0's anyway). DDP averages the two half-batch mean gradients, which is the full-batch mean. What is
    left is floating-point order: gloo's all-reduce, and one thread per process instead of two. Measured
    here, one process on 1 thread against one on 2 threads differs by up to 1.8e-5 after these 6 steps
    (AdamW's division by sqrt(v) amplifies rounding on weights whose gradients are near zero), DDP
    against one process by 2.4e-5, with a median of 4e-9; training itself moves the weights by about
    1.5e-3 (median). Hence: at most 1e-4 anywhere, and fewer than 0.1% of the weights off by over 1e-6.
    """
    from lethe.data.prepared import PreparedData
    from lethe.models.diffusion_model import build_model
    from lethe.models.text import corpus_vocabulary

    for name in ("single", "ddp"):
        (tmp_path / name).mkdir()
    common = {"steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 100, "accelerator": "cpu"}
    write_params(tmp_path / "single/params.yaml", SMOKE, pretrain={**common, "devices": 1})
    write_params(tmp_path / "ddp/params.yaml", SMOKE, pretrain={**common, "devices": 2, "strategy": "ddp"})
    monkeypatch.chdir(tmp_path / "single")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert main(["prepare"]) == 0
    shutil.copytree(tmp_path / "single/data", tmp_path / "ddp/data")
    started = time.perf_counter()
    lethe("pretrain", cwd=tmp_path / "ddp")  # Lightning's launcher starts rank 1 as a second `lethe pretrain`
    ddp_seconds = time.perf_counter() - started
    assert main(["pretrain"]) == 0  # one process, in this one

    single, ddp = (load_file(tmp_path / n / "models/pretrained/weights.safetensors") for n in ("single", "ddp"))
    params = load_params("params.yaml")
    torch.manual_seed(params.pretrain.seed)  # the initial weights, as the pretrain stage builds them
    data = PreparedData.load("data/prepared")
    init = build_model(params.model, 16, 1, corpus_vocabulary([r.caption for r in data.records])).state_dict()
    assert single.keys() == ddp.keys()
    difference = torch.cat([(single[k] - ddp[k]).abs().flatten() for k in single])
    moved = torch.cat([(single[k] - init[k]).abs().flatten() for k in single])
    print(f"DDP vs one process: max |dw| {difference.max():.2e}, median {difference.median():.1e}, "
          f"share over 1e-6 {(difference > 1e-6).float().mean():.1e}; training moved weights by "
          f"median {moved.median():.1e}, max {moved.max():.1e}; DDP run {ddp_seconds:.0f} s")
    assert difference.max() < DDP_TOLERANCE
    assert (difference > 1e-6).float().mean() < 1e-3
    assert moved.median() > 100 * 1e-6 and moved.max() > 10 * DDP_TOLERANCE  # the check could fail

    import mlflow  # rank 1 trained but logged nothing: one run, from rank 0

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'ddp/mlruns/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lethe-smoke"])
    assert len(runs) == 1 and runs["tags.mlflow.runName"][0] == "pretrain"
    assert float(runs["metrics.train/samples_seen"][0]) == 48


# --------------------------------------------------------------------------- MLflow tracking server

@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, 15)  # the server and the workers it started, nothing else
    server.wait(timeout=30)


@pytest.mark.slow
def test_stage_logs_to_a_tracking_server_and_a_registered_model_loads_back(project, mlflow_server, tmp_path):
    import mlflow
    import pandas as pd

    from lethe.pyfunc import log_pyfunc
    from lethe.tracking import stage_run

    write_params(project / "params.yaml", SMOKE, tracking={"experiment": "lethe-server", "uri": mlflow_server},
                 pretrain={"steps": 4})
    assert main(["prepare"]) == 0 and main(["pretrain"]) == 0

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("lethe-server")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"prepare", "pretrain"}  # prepare logs what duplicates the data holds
    run = runs["pretrain"]
    assert run.data.tags["stage"] == "pretrain" and runs["prepare"].data.metrics["data/planted_pairs"] == 4
    assert run.data.params["pretrain.steps"] == "4" and run.data.metrics["train/samples_seen"] == 32
    assert "samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert not (project / "mlruns").exists()  # nothing went to a local store
    assert any((tmp_path / "server-artifacts").rglob("samples.png"))  # the server stored the artifact

    params = load_params(project / "params.yaml")
    with stage_run(params, stage="register", method="register", sections=("registry",), data_hash=""):
        log_pyfunc("pretrained", project / "models/pretrained", params, "lethe-server-model")
    model = mlflow.pyfunc.load_model("models:/lethe-server-model/1")
    images = model.predict(pd.DataFrame({"prompt": ["a bold handwritten seven"], "seed": [0]}))
    assert images.shape == (1, 16, 16, 1) and images.dtype == np.uint8
