"""The one LightningModule every method trains through.

ε-prediction (or v-prediction, where a checkpoint's scheduler asks for it) on diffusers' DDPM
schedule, with captions dropped to the empty prompt so the model also learns the unconditional
branch that classifier-free guidance needs. Methods that skip samples (Wen's
filter, anti-gradient control) override `select`; ensembles override `model_for_step` and
`batch_pool`. A batch whose samples are all skipped makes no optimizer step at all (an Adam step on a
zero gradient would still move the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from diffusers import DDPMScheduler

from lethe.config import TrainConfig
from lethe.diffusion import noised, per_sample_loss, unconditional_prediction
from lethe.errors import TrainingDiverged
from lethe.models.diffusion_model import DiffusionModel


@dataclass
class Denoised:
    losses: torch.Tensor  # one per sample, mean over its pixels
    t: torch.Tensor
    noisy: torch.Tensor
    states: torch.Tensor  # the text conditioning used (empty where the caption was dropped)
    prediction: torch.Tensor
    dropped: torch.Tensor  # rows whose caption was dropped for classifier-free guidance


def step_seed(seed: int, step: int) -> int:
    """The torch seed of a training step: a function of the run's seed and the step alone."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class DiffusionTraining(L.LightningModule):
    """`keep(step, global_batch_size)`, when given, says which samples of a step's global batch train
    (a method that skips without looking at the samples: the random-skip control)."""

    def __init__(self, model: DiffusionModel, noise_scheduler: DDPMScheduler, cfg: TrainConfig, keep=None):
        super().__init__()
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.cfg = cfg
        self.keep = keep
        model.text_encoder.requires_grad_(cfg.train_text_encoder)
        if cfg.train_text_encoder:
            model.spec.save_text_encoder = True
        self.register_buffer("empty_ids", model.text_encoder.tokenize([""])[0], persistent=False)
        # each step's skipped share, kept in checkpoints so a resumed run has the whole curve
        self.register_buffer("skipped_per_step", torch.zeros(max(cfg.steps, 1)))
        # the batches consumed, kept in checkpoints: where a resumed run's batches start (a batch whose samples
        # are all skipped makes no optimizer step, so the global step can lag it)
        self.register_buffer("batches_done", torch.zeros((), dtype=torch.long))

    def denoise(self, batch: dict, model: DiffusionModel | None = None, t: torch.Tensor | None = None) -> Denoised:
        """Noise the images at random timesteps (or the given ones) and predict the noise.

        The random draws (caption dropout, noise, timesteps) are made for the whole global batch, in
        that order, and this rank keeps its rows.
        """
        model = model or self.model
        x0 = batch["latents"] if "latents" in batch else model.encode_images(batch["images"])  # latents: cached
        total, rows = self.global_rows(len(batch["ids"]))
        dropped = (torch.rand(total, device=batch["ids"].device) < self.cfg.caption_dropout)[rows]
        states = self.condition(model, batch["ids"], dropped)
        noise = torch.randn((total, *x0.shape[1:]), dtype=x0.dtype, device=x0.device)[rows]
        if t is None:
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (total,), device=x0.device)[rows]
        noisy, target = noised(self.noise_scheduler, x0, noise, t)
        prediction = model.unet(noisy, t, encoder_hidden_states=states).sample
        return Denoised(per_sample_loss(prediction, target), t, noisy, states, prediction, dropped)

    def condition(self, model: DiffusionModel, ids: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """The text conditioning, with the dropped rows' captions emptied for classifier-free guidance."""
        ids = torch.where(dropped[:, None], self.empty_ids, ids)
        with torch.set_grad_enabled(self.cfg.train_text_encoder and torch.is_grad_enabled()):
            return model.encode_text(ids)

    def global_rows(self, n: int) -> tuple[int, slice]:
        """The global batch size and this rank's rows in it, when each of W ranks holds n samples.

        Every rank draws the random numbers of the whole global batch from the same seeded stream and
        keeps its own rows, so W processes give each sample the noise one process would (W = 1: n, all).
        """
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None and self.training else (1, 0)
        return n * world, slice(rank * n, (rank + 1) * n)

    def per_sample_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoising loss per sample (mean over its pixels) and the timesteps drawn for it."""
        d = self.denoise(batch)
        return d.losses, d.t

    def model_for_step(self, step: int) -> DiffusionModel:
        return self.model

    def batch_pool(self, step: int, size: int) -> np.ndarray:
        """Dataset positions the batch of a step is drawn from: all of them, unless a method shards."""
        return np.arange(size)

    def select(self, d: Denoised, batch: dict, model: DiffusionModel) -> torch.Tensor:
        """Which samples contribute a gradient: all of them for plain fine-tuning, or those `keep` keeps."""
        if self.keep is None:
            return torch.ones_like(d.losses, dtype=torch.bool)
        total, rows = self.global_rows(len(d.losses))
        return self.keep(self.current_step, total)[rows].to(d.losses.device)

    def kept_loss(self, d: Denoised, keep: torch.Tensor, batch: dict, model: DiffusionModel) -> torch.Tensor:
        return d.losses[keep].mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self.current_step = int(batch["step"][0]) if "step" in batch else self.global_step
        self.batches_done.fill_(self.current_step + 1)
        # every draw of this step (caption dropout, noise, timesteps, a method's own) from a stream seeded by
        # (seed, step): a run resumed at any step draws what an uninterrupted one would
        torch.manual_seed(step_seed(self.cfg.seed, self.current_step))
        model = self.model_for_step(self.current_step)
        d = self.denoise(batch, model)
        self.check_finite(d.losses.mean())
        keep = self.select(d, batch, model)
        self.log("train/loss", d.losses.mean(), prog_bar=True)
        skipped = 1.0 - keep.float().mean()
        if self._trainer is not None and self.trainer.world_size > 1:  # the global batch's share, not this rank's
            skipped = self.trainer.strategy.reduce(skipped, reduce_op="mean")
        self.log("train/skipped_share", skipped)
        if self.current_step < len(self.skipped_per_step):
            self.skipped_per_step[self.current_step] = skipped.detach()
        if not keep.any():
            return None
        return self.kept_loss(d, keep, batch, model)

    def unconditional_prediction(self, d: Denoised, model: DiffusionModel) -> torch.Tensor:
        """The same noisy input denoised with the empty prompt, without gradient."""
        with torch.no_grad():
            return unconditional_prediction(model.unet, d.noisy, d.t, model.encode_text(self.empty_ids[None]))

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.global_step}; lower the learning rate or check the data "
                "(the last good checkpoint is kept, and a re-run resumes from it)"
            )

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel for every tensor. On the CPU the per-tensor default took 17-23 ms of the embedded
        # model's ~300 ms step, fused 4-5 ms: the same update, rounding aside. Not under mixed precision: Lightning
        # refuses to clip the gradients of an optimizer that unscales them itself (CUDA's default is foreach).
        fused = "mixed" not in str(self.cfg.precision) and all(p.device.type in ("cpu", "cuda") for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        warmup = max(self.cfg.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def trained_model(self) -> DiffusionModel:
        """The model to save once fit returns (an ensemble merges its proxies here)."""
        return self.model
