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
from torch.utils.data import DataLoader, Dataset, Sampler

from lethe.config import TrainConfig
from lethe.data.prepared import PreparedData, Record, to_float
from lethe.training.module import DiffusionTraining


class CaptionedImages(Dataset):
    """Training records (duplicates already expanded) as image tensors and token ids.

    `caption_noise`, when given, rewrites a caption each time it is drawn (random caption words).
    """

    def __init__(self, data: PreparedData, records: list[Record], tokenize, caption_noise=None):
        self.images = data.images
        self.image_ids = np.array([r.id for r in records])
        self.captions = [r.caption for r in records]
        self.tokenize, self.caption_noise = tokenize, caption_noise
        self.token_ids = tokenize(self.captions) if caption_noise is None else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, step = key if isinstance(key, tuple) else (key, -1)  # StepBatches also passes the step
        if self.caption_noise is None:
            ids = self.token_ids[i]
        else:
            ids = self.tokenize([self.caption_noise(self.captions[i])])[0]
        return {"images": to_float(self.images[self.image_ids[i]]), "ids": ids, "index": i, "step": step}


class StepBatches(Sampler):
    """Batch s is drawn with replacement from `pool(s)` by a generator seeded with (seed, s).

    So a run resumed at step s sees exactly the batches an uninterrupted run would have, and a method
    that moves samples between shards mid-run (IET-AGC+) is seen by the very next batch.
    """

    def __init__(self, pool, steps: int, batch_size: int, seed: int, start=lambda: 0):
        self.pool, self.steps, self.batch_size, self.seed, self.start = pool, steps, batch_size, seed, start

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.start(), self.steps):
            members = self.pool(step)
            rng = np.random.default_rng([self.seed, step])
            yield [(int(i), step) for i in members[rng.integers(0, len(members), self.batch_size)]]


def training_loader(dataset: Dataset, cfg: TrainConfig, pool=None, start=lambda: 0) -> DataLoader:
    """Exactly `steps` batches, one long epoch, whatever the dataset's size."""
    pool = pool or (lambda step: np.arange(len(dataset)))
    return DataLoader(dataset, batch_sampler=StepBatches(pool, cfg.steps, cfg.batch_size, cfg.seed, start))


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
    loader = training_loader(dataset, cfg, pool=lambda step: module.batch_pool(step, len(dataset)),
                             start=lambda: module.global_step)  # read after a resume has restored it
    trainer.fit(module, loader, ckpt_path=resume)
    return FitResult(time.perf_counter() - started, trainer.global_step, resume)
