"""What `pretrain` and `train@<method>` share: train a module, write the model and its sample grid, log it all."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlflow

from lethe.config import Params, ProbeConfig, TrainConfig
from lethe.data.latents import cached_latents
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device, is_main_process
from lethe.files import atomic_dir, content_hash, write_json
from lethe.memorization.probe import probe
from lethe.models.diffusion_model import build_scheduler, save_model
from lethe.paths import CHECKPOINTS, DATA, PRETRAINED, model_dir, train_metrics_file
from lethe.sampling import generate, save_grid
from lethe.tracking import lightning_logger, stage_run
from lethe.training.fit import CHECKPOINT_FORMAT, CaptionedImages, FitResult, checkpoint_key, fit
from lethe.training.module import DiffusionTraining


def checkpoint_dir(params: Params, name: str, stage: str, data_hash: str, inputs: tuple[str, ...] = ()) -> Path:
    """Where a run keeps what it resumes from: keyed by the params, the data, the pretrained model and the
    contents of the files the method reads, so that a resumed run is the run that was killed."""
    base_hash = content_hash(PRETRAINED) if stage != "pretrain" else None
    read = [content_hash(path) for path in inputs if Path(path).exists()]
    key = checkpoint_key(CHECKPOINT_FORMAT, name, params.model_dump(mode="json"), data_hash, base_hash, *read)
    return CHECKPOINTS / f"{name}-{key}"


def train_and_save(params: Params, model, data: PreparedData, *, name: str, stage: str, method: str,
                   cfg: TrainConfig, split: str, sections: tuple[str, ...], training=None, caption_noise=None,
                   probe_cfg: ProbeConfig | None = None, inputs: tuple[str, ...] = ()) -> dict:
    """Train `model` on a split through `training(model, scheduler, samples)` (default: plain fine-tuning),
    save it as `models/<name>`, and probe it afterwards when `probe_cfg` is given. `inputs`: the files the
    method reads (a chosen mask, LoyalDiffusion's skips, a followed skip curve); a changed one starts afresh."""
    scheduler = build_scheduler(model, params.diffusion)
    data_hash = content_hash(DATA)
    checkpoints = checkpoint_dir(params, name, stage, data_hash, inputs)
    records = data.training_records(split) if cfg.steps else data.split(split)  # steps 0: the model as it is
    # latent path: VAE latents encoded once per dataset and VAE, so training never runs the encoder
    latents = None
    if model.vae is not None and cfg.steps:
        latents = cached_latents(model, data, data_hash, inference_device(cfg.accelerator))
    module = (training or (lambda m, s, n: DiffusionTraining(m, s, cfg)))(model, scheduler, len(records))
    noise = caption_noise([r.caption for r in records]) if caption_noise else None
    dataset = CaptionedImages(data, records, model.text_encoder.tokenize, noise, latents=latents)
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
        skipped = module.skipped_per_step[: result.steps].cpu().tolist()
        log_curve(run, "train/skipped_share_per_step", skipped)
        metrics = {
            "cost/train_seconds": result.seconds,
            "cost/trainable_params": float(module.trainable_parameter_count()),
            "train/samples_seen": float(result.steps * cfg.batch_size),
            "train/skipped_share_mean": sum(skipped) / max(len(skipped), 1),  # Lightning logs train/skipped_share
        }
        out = model_dir(name)
        with atomic_dir(out) as tmp:
            trained = module.trained_model()
            save_model(trained, tmp, method=method)
            write_json(tmp / "skipped_per_step.json", skipped)  # the curve a random-skip control can follow
            trained.to(inference_device(cfg.accelerator))  # Lightning hands the model back on the CPU
            _sample_grid(params, trained, scheduler, data, tmp / "samples.png")
        mlflow.log_artifact(str(out / "samples.png"))
        if probe_cfg is not None:
            metrics |= probe(trained, scheduler, data, params.sample, probe_cfg)
        mlflow.log_metrics(metrics)
        write_json(train_metrics_file(name), metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the outputs are written; nothing left to resume
    return metrics


def log_curve(run, key: str, values: list[float]) -> None:
    """One MLflow metric per step, in batches of MLflow's limit of 1,000."""
    from mlflow.entities import Metric

    client, now = mlflow.MlflowClient(), int(time.time() * 1000)
    for start in range(0, len(values), 1000):
        client.log_batch(run.info.run_id, metrics=[Metric(key, float(v), now, start + i)
                                                   for i, v in enumerate(values[start : start + 1000])])


def _sample_grid(params: Params, model, scheduler, data: PreparedData, path: Path) -> None:
    """Generations for the first captions of each split, one seed each: a look at what the model learned."""
    per_split = max(1, params.sample.grid_size // 3)
    records = [r for s in ("pretrain", "target", "holdout") for r in data.split(s)[:per_split]]
    records = records[: params.sample.grid_size]
    images = generate(model, scheduler, [r.caption for r in records], [0] * len(records), params.sample)
    save_grid(images, path, nrow=per_split)
