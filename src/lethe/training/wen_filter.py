"""Wen et al.'s training-time filter: skip samples whose prompt pulls the denoiser unusually hard.

One extra pass without gradient on the same noisy input with the empty prompt gives the
text-conditional noise magnitude; a sample is dropped when it exceeds `factor` times the running
magnitude of its range of timesteps (magnitudes differ by orders of magnitude across t, so one
absolute threshold would only ever drop the noisiest timesteps). A range drops nothing until it has
seen `min_samples` magnitudes (`TimestepBank`).
"""

from __future__ import annotations

import torch
from torch import nn

from lethe.diffusion import noise_magnitude
from lethe.training.banks import TimestepBank
from lethe.training.module import Denoised, DiffusionTraining


class WenFilter(nn.Module):
    def __init__(self, num_timesteps: int, factor: float, momentum: float = 0.8, bins: int = 10, min_samples: int = 32):
        super().__init__()
        self.factor = factor
        self.bank = TimestepBank(num_timesteps, momentum, bins, min_samples)

    @torch.no_grad()
    def forward(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, t: torch.Tensor,
                judged: torch.Tensor | None = None) -> torch.Tensor:
        """Which samples to keep; `judged` False (a dropped caption: no text, magnitude 0) keeps a row
        and leaves it out of the bank, which it would drag toward 0 and so make the filter skip more."""
        magnitude = noise_magnitude(eps_cond, eps_uncond)
        judged = torch.ones_like(magnitude, dtype=torch.bool) if judged is None else judged.to(magnitude.device)
        usual = self.bank[t].clone()
        keep = ~judged | ~self.bank.ready(t) | (magnitude <= self.factor * usual)
        self.bank.update(t[judged], magnitude[judged])
        return keep


class WenFilteredTraining(DiffusionTraining):
    """Fine-tuning that drops the samples Wen's filter flags."""

    def __init__(self, model, noise_scheduler, cfg, factor: float, momentum: float = 0.8, bins: int = 10,
                 min_samples: int = 32):
        super().__init__(model, noise_scheduler, cfg)
        self.filter = WenFilter(noise_scheduler.config.num_train_timesteps, factor, momentum, bins, min_samples)

    def select(self, d: Denoised, batch: dict, model) -> torch.Tensor:
        return self.filter(d.prediction, self.unconditional_prediction(d, model), d.t, ~d.dropped)
