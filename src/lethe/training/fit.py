"""Run a Lightning fit with the project's conventions: EMA, clipping, periodic checkpoints, resume, scale-out.

Resume checkpoints live under `.lethe/checkpoints/<key>/`, outside DVC's outputs (DVC deletes a stage's
outputs before re-running it, which would throw away the very checkpoint a re-run needs). The key
hashes everything that determines the run, so a changed param never resumes from a stale checkpoint.
The directory is removed once the stage's outputs are written.

Scale-out: `strategy`, `accelerator`, `devices`, `num_nodes` and `precision` go to Lightning. `batch_size`
is the global batch: each of the W = devices x num_nodes processes takes its own contiguous 1/W of the
batch `StepBatches` draws for a step (Lightning's distributed sampler is off: it cannot split a batch
sampler), and the module draws noise, timesteps and caption dropout for the whole global batch and
keeps its rows, so W processes see the same samples with the same noise as one process would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor, WeightAveraging
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from lethe.config import TrainConfig
from lethe.data.prepared import PreparedData, Record, to_float
from lethe.errors import LetheError
from lethe.progress import progress
from lethe.training.module import DiffusionTraining


class CaptionedImages(Dataset):
    """Training records (duplicates already expanded) as image tensors and token ids.

    `caption_noise(caption, draw)`, when given, rewrites a caption each time it is drawn (random caption
    words), its randomness a function of the draw (step, position in the global batch) alone.
    `latents`, when given (the latent path), are the cached VAE latents of every prepared image: items
    then carry `latents` instead of `images`, and training never runs the VAE encoder.
    """

    def __init__(self, data: PreparedData, records: list[Record], tokenize, caption_noise=None,
                 latents: torch.Tensor | None = None):
        self.images, self.latents = data.images, latents
        self.image_ids = np.array([r.id for r in records])
        self.captions = [r.caption for r in records]
        self.tokenize, self.caption_noise = tokenize, caption_noise
        self.token_ids = tokenize(self.captions) if caption_noise is None else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        # StepBatches passes (index, step, position in the global batch): a draw's place in the run
        i, step, position = key if isinstance(key, tuple) else (key, -1, 0)
        if self.caption_noise is None:
            ids = self.token_ids[i]
        else:
            ids = self.tokenize([self.caption_noise(self.captions[i], (step, position))])[0]
        if self.latents is not None:
            return {"latents": self.latents[self.image_ids[i]], "ids": ids, "index": i, "step": step}
        return {"images": to_float(self.images[self.image_ids[i]]), "ids": ids, "index": i, "step": step}


class StepBatches(Sampler):
    """Batch s is drawn with replacement from `pool(s)` by a generator seeded with (seed, s).

    So a run resumed at step s sees exactly the batches an uninterrupted run would have, and a method
    that moves samples between shards mid-run (IET-AGC+) is seen by the very next batch.
    `batch_size` is the global batch; `shard()` gives (world size, rank), read when iteration starts
    (after Lightning has set the ranks up), and each rank yields its contiguous share of every batch.
    """

    def __init__(self, pool, steps: int, batch_size: int, seed: int, start=lambda: 0, shard=lambda: (1, 0)):
        self.pool, self.steps, self.batch_size, self.seed, self.start = pool, steps, batch_size, seed, start
        self.shard = shard

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        world, rank = self.shard()
        if self.batch_size % world:
            raise LetheError(f"batch_size {self.batch_size} does not split evenly over {world} processes")
        share = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        for step in range(self.start(), self.steps):
            members = self.pool(step)
            rng = np.random.default_rng([self.seed, step])
            drawn = members[rng.integers(0, len(members), self.batch_size)]
            yield [(int(i), step, position) for position, i in enumerate(drawn)][share]


class StepLoader(DataLoader):
    """A DataLoader over `StepBatches` that tells Lightning it resumes: its position is not its own state
    but the training module's `batches_done`, which the checkpoint restores before iteration starts."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def training_loader(dataset: Dataset, cfg: TrainConfig, pool=None, start=lambda: 0, shard=lambda: (1, 0)) -> DataLoader:
    """Exactly `steps` batches, one long epoch, whatever the dataset's size."""
    pool = pool or (lambda step: np.arange(len(dataset)))
    return StepLoader(dataset, batch_sampler=StepBatches(pool, cfg.steps, cfg.batch_size, cfg.seed, start, shard))


# what a resume checkpoint holds (its state's keys): raised when that changes, so an older checkpoint is not
# loaded into a module it does not fit (2: the step-seeded draws and `batches_done`)
CHECKPOINT_FORMAT = 2


def checkpoint_key(*parts) -> str:
    """A short stable hash of JSON-able parts (params, input hashes) naming a resumable run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FitResult:
    seconds: float
    steps: int
    resumed_from: str | None
    is_main: bool = True  # global rank 0: the process that writes outputs
    module: DiffusionTraining | None = None  # the trained module (under FSDP: an unsharded copy, on rank 0)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Recompute every U-Net's activations in the backward pass (RAU-Net and proxies included)."""
    unets = [m for m in module.modules() if isinstance(m, UNet2DConditionModel)]
    for unet in unets:
        unet.enable_gradient_checkpointing()
    return len(unets)


class GatherFullWeights(L.Callback):
    """Under FSDP, the full (unsharded) weights at the end of training: every rank takes part, rank 0 keeps them."""

    state: dict | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP


class StepProgress(L.Callback):
    """Training steps and the loss as lethe shows progress (a bar, or a line every few seconds in a log);
    Lightning's own bar redraws with carriage returns, which a log keeps as one line. Rank 0 only."""

    def __init__(self, label: str = "train"):
        self.label, self.bar = label, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = progress(total=trainer.max_steps, desc=self.label, unit="step")
            self.bar.update(trainer.global_step)  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.bar is not None:
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


def _trainer(cfg: TrainConfig, **kwargs) -> L.Trainer:
    """Lightning's Trainer; a strategy, accelerator, device or precision it refuses is a params error."""
    for name in ("lightning.pytorch", "lightning.fabric"):  # its banners (GPU available, tips): not the stage's
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # one epoch of `steps` batches: it ends the fit also where whole batches were skipped (no optimizer step)
        return L.Trainer(max_steps=cfg.steps, max_epochs=1, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                         strategy=cfg.strategy, precision=cfg.precision, use_distributed_sampler=False, **kwargs)
    except (MisconfigurationException, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LetheError(f"training params (strategy {cfg.strategy!r}, accelerator {cfg.accelerator!r}, devices "
                         f"{cfg.devices!r}, num_nodes {cfg.num_nodes}, precision {cfg.precision!r}): {first}")


class ExactEMA(WeightAveraging):
    """An EMA of the weights after every optimizer step, by torch's `get_ema_multi_avg_fn`: one in-place
    `lerp` towards the current weights over all of them. Lightning's EMAWeightAveraging uses torch's
    `decay * average + (1 - decay) * current`, which rounds a weight that never moves (a frozen one: everything
    outside a LoRA or a masked method's parameters) away from itself; a lerp leaves it bit for bit the base's."""

    def __init__(self, decay: float):
        super().__init__(use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))


def fit(
    module: DiffusionTraining, dataset: Dataset, cfg: TrainConfig, checkpoint_dir: Path, logger=None, callbacks=()
) -> FitResult:
    """Train for cfg.steps optimizer steps; resume from `checkpoint_dir/last.ckpt` when it exists.

    On return the module holds the EMA weights (Lightning's EMA callback swaps them in at the end; with
    `ema_decay: 0` there is no EMA callback, which gives the same weights). Under DDP every process
    calls this; `FitResult.is_main` says which one writes the outputs.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.ckpt"
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    sharded = "fsdp" in str(cfg.strategy).lower()
    unsharded = copy.deepcopy(module) if sharded else None  # FSDP replaces the parameters it shards
    gather = GatherFullWeights()
    trainer = _trainer(
        cfg,
        gradient_clip_val=cfg.grad_clip,
        logger=logger if logger is not None else False,
        callbacks=[
            *([ExactEMA(cfg.ema_decay)] if cfg.ema_decay > 0 else []),
            ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=cfg.checkpoint_every, save_last=True),
            *([LearningRateMonitor(logging_interval="step"),
               # rates over a sliding window of batches; short runs get a short window
               ThroughputMonitor(batch_size_fn=lambda batch: len(batch["ids"]), window_size=max(2, min(100, cfg.steps // 4)))]
              if logger is not None else []),
            *([gather] if sharded else []),
            StepProgress(),
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
                             start=lambda: int(module.batches_done),  # read after a resume has restored it
                             shard=lambda: (trainer.world_size, trainer.global_rank))
    trainer.fit(module, loader, ckpt_path=resume)
    if sharded:  # the full weights, gathered at the end of training, into the unsharded copy on rank 0
        if trainer.is_global_zero:
            unsharded.load_state_dict(gather.state)
        module = unsharded
    return FitResult(time.perf_counter() - started, trainer.global_step, resume, trainer.is_global_zero, module)
