"""The one LightningModule every method trains through.

ε-prediction (or v-prediction, where a checkpoint's scheduler asks for it) on diffusers' DDPM
schedule, with captions dropped to the empty prompt so the model also learns the unconditional
branch that classifier-free guidance needs. Methods that filter or reweight samples build on
`per_sample_loss`, which returns one loss per sample and its timestep.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lethe.config import TrainConfig
from lethe.errors import TrainingDiverged
from lethe.models.factory import DiffusionModel


class DiffusionTraining(L.LightningModule):
    def __init__(self, model: DiffusionModel, noise_scheduler: DDPMScheduler, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.cfg = cfg
        model.text_encoder.requires_grad_(cfg.train_text_encoder)
        if cfg.train_text_encoder:
            model.spec["save_text_encoder"] = True
        self.register_buffer("empty_ids", model.text_encoder.tokenize([""])[0], persistent=False)

    def per_sample_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoising loss per sample (mean over its pixels) and the timesteps drawn for it."""
        x0 = self.model.encode_images(batch["images"])
        ids = batch["ids"]
        dropped = torch.rand(len(ids), device=ids.device) < self.cfg.caption_dropout
        ids = torch.where(dropped[:, None], self.empty_ids, ids)
        with torch.set_grad_enabled(self.cfg.train_text_encoder and torch.is_grad_enabled()):
            states = self.model.encode_text(ids)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        prediction = self.model.unet(noisy, t, encoder_hidden_states=states).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        losses = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return losses, t

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, _ = self.per_sample_loss(batch)
        loss = losses.mean()
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.global_step}; lower the learning rate or check the data "
                "(the last good checkpoint is kept, and a re-run resumes from it)"
            )

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = max(self.cfg.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
