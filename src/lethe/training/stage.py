"""The `pretrain` and `train@<method>` stages: read params and data, train, write the model, log it all."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import torch

from lethe.config import Params, TrainConfig
from lethe.data.latents import cached_latents
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device, is_main_process
from lethe.files import atomic_dir, content_hash, write_json
from lethe.memorization.probe import probe
from lethe.models.factory import build_model, build_scheduler, load_model, save_model
from lethe.models.text import corpus_vocabulary
from lethe.sampling import generate, save_grid
from lethe.tracking import lightning_logger, stage_run
from lethe.training.fit import CaptionedImages, FitResult, checkpoint_key, fit
from lethe.training.methods import SECTIONS, caption_noise, training_module
from lethe.training.module import DiffusionTraining

DATA = Path("data/prepared")
PRETRAINED = Path("models/pretrained")



def pretrain(params: Params) -> dict:
    """Train the base model from scratch on the pretraining split."""
    data = PreparedData.load(DATA)
    torch.manual_seed(params.pretrain.seed)  # the same initial weights in every run and every DDP process
    if params.model.kind == "pixel":
        model = build_model(params.model, params.data.resolution, params.data.channels,
                            corpus_vocabulary([r.caption for r in data.records]))
    else:
        model = build_model(params.model, params.data.resolution, params.data.channels)
    return _train(params, model, data, name="pretrained", stage="pretrain", method="pretrain",
                  cfg=params.pretrain, split="pretrain", sections=("data", "model", "diffusion", "pretrain"))


def finetune(params: Params, method: str) -> dict:
    """Fine-tune the base model on the target split (with its planted duplicates)."""
    data = PreparedData.load(DATA)
    model = load_model(PRETRAINED)
    return _train(params, model, data, name=method, stage="train", method=method, cfg=params.finetune, split="target",
                  sections=("finetune", "sample", "probe", *SECTIONS[method]), probe_after=True)


def _train(params: Params, model, data: PreparedData, *, name: str, stage: str, method: str, cfg: TrainConfig,
           split: str, sections: tuple[str, ...], probe_after: bool = False) -> dict:
    scheduler = build_scheduler(model, params.diffusion)
    data_hash = content_hash(DATA)
    base_hash = content_hash(PRETRAINED) if stage != "pretrain" else None
    key = checkpoint_key(name, params.model_dump(mode="json"), data_hash, base_hash)
    checkpoints = Path(".lethe/checkpoints") / f"{name}-{key}"
    records = data.training_records(split) if cfg.steps else data.split(split)  # steps 0: the model as it is
    captions = [r.caption for r in records]
    # latent path: VAE latents encoded once per dataset and VAE, so training never runs the encoder
    latents = None
    if model.vae is not None and cfg.steps:
        latents = cached_latents(model, data, data_hash, inference_device(cfg.accelerator))
    if stage == "pretrain":
        module = DiffusionTraining(model, scheduler, cfg)
        dataset = CaptionedImages(data, records, model.text_encoder.tokenize, latents=latents)
    else:
        module = training_module(params, method, model, scheduler, len(records))
        dataset = CaptionedImages(data, records, model.text_encoder.tokenize, caption_noise(params, method, captions),
                                  latents=latents)
    if not is_main_process():  # a DDP worker: trains its share of every batch; rank 0 logs and writes
        if cfg.steps:
            fit(module, dataset, cfg, checkpoints)
        return {}
    with stage_run(params, stage=stage, method=method, sections=sections, data_hash=data_hash) as run:
        mlflow.log_param("data/samples", len(records))
        if cfg.steps:
            result = fit(module, dataset, cfg, checkpoints, logger=lightning_logger(run, params.tracking))
            module = result.module or module
        else:
            result = FitResult(0.0, 0, None)
        metrics = {
            "cost/train_seconds": result.seconds,
            "cost/trainable_params": float(module.trainable_parameter_count()),
            "train/samples_seen": float(result.steps * cfg.batch_size),
        }
        out = Path("models") / name
        with atomic_dir(out) as tmp:
            trained = module.trained_model()
            save_model(trained, tmp, method=method)
            trained.to(inference_device(cfg.accelerator))  # Lightning hands the model back on the CPU
            _sample_grid(params, trained, scheduler, data, tmp / "samples.png")
        mlflow.log_artifact(str(out / "samples.png"))
        if probe_after:
            metrics |= probe(trained, scheduler, data, params.sample, params.probe)
        mlflow.log_metrics(metrics)
        write_json(Path("metrics/train") / f"{name}.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the outputs are written; nothing left to resume
    return metrics


def _sample_grid(params: Params, model, scheduler, data: PreparedData, path: Path) -> None:
    """Generations for the first captions of each split, one seed each: a look at what the model learned."""
    per_split = max(1, params.sample.grid_size // 3)
    records = [r for s in ("pretrain", "target", "holdout") for r in data.split(s)[:per_split]]
    records = records[: params.sample.grid_size]
    images = generate(model, scheduler, [r.caption for r in records], [0] * len(records), params.sample)
    save_grid(images, path, nrow=per_split)
