"""Run a Lightning fit with the project's conventions: EMA, clipping, periodic checkpoints, resume.

Resume checkpoints live under `.lethe/checkpoints/<key>/`, outside DVC's outputs (DVC deletes a stage's
outputs before re-running it, which would throw away the very checkpoint a re-run needs). The key
hashes everything that determines the run, so a changed param never resumes from a stale checkpoint.
The directory is removed once the stage's outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lethe.config import TrainConfig
from lethe.data.prepared import PreparedData, Record, to_float
from lethe.training.module import DiffusionTraining


class CaptionedImages(Dataset):
    """Training records (duplicates already expanded) as image tensors and token ids."""

    def __init__(self, data: PreparedData, records: list[Record], tokenize):
        self.images = data.images
        self.image_ids = np.array([r.id for r in records])
        self.token_ids = tokenize([r.caption for r in records])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict:
        return {"images": to_float(self.images[self.image_ids[i]]), "ids": self.token_ids[i]}


def training_loader(dataset: Dataset, cfg: TrainConfig) -> DataLoader:
    """Draw exactly `steps` batches with replacement: one long epoch, whatever the dataset's size."""
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=cfg.steps * cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)


def checkpoint_key(*parts) -> str:
    """A short stable hash of JSON-able parts (params, input hashes) naming a resumable run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FitResult:
    seconds: float
    steps: int
    resumed_from: str | None


def fit(
    module: DiffusionTraining, dataset: Dataset, cfg: TrainConfig, checkpoint_dir: Path, logger=None, callbacks=()
) -> FitResult:
    """Train for cfg.steps optimizer steps; resume from `checkpoint_dir/last.ckpt` when it exists.

    On return the module holds the EMA weights (Lightning's EMA callback swaps them in at the end).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.ckpt"
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        gradient_clip_val=cfg.grad_clip,
        logger=logger if logger is not None else False,
        callbacks=[
            EMAWeightAveraging(decay=cfg.ema_decay, use_buffers=False),
            ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=cfg.checkpoint_every, save_last=True),
            *([LearningRateMonitor(logging_interval="step"),
               # rates over a sliding window of batches; short runs get a short window
               ThroughputMonitor(batch_size_fn=lambda batch: len(batch["ids"]), window_size=max(2, min(100, cfg.steps // 4)))]
              if logger is not None else []),
            *callbacks,
        ],
        log_every_n_steps=max(1, min(10, cfg.steps // 4)),
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    resume = str(last) if last.exists() else None
    started = time.perf_counter()
    trainer.fit(module, training_loader(dataset, cfg), ckpt_path=resume)
    return FitResult(time.perf_counter() - started, trainer.global_step, resume)
