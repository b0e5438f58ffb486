"""Anti-gradient control (IET-AGC, Liu et al. 2024) and IET-AGC+'s threshold-aware weights.

A memory bank holds a running loss per range of timesteps. A sample whose loss is already far below
what is usual at its timestep (λ·ℓ < m[t]) is one the model has nearly memorized: its gradient is
skipped. The bank is updated with every sample, kept or skipped, so it tracks the typical loss; a
range skips nothing until it has seen `min_samples` losses (`TimestepBank`).
"""

from __future__ import annotations

import torch
from torch import nn

from lethe.training.banks import TimestepBank


class AntiGradientControl(nn.Module):
    def __init__(self, num_timesteps: int, lam: float, momentum: float = 0.8, bins: int = 10, min_samples: int = 32):
        super().__init__()
        self.lam = lam
        self.bank = TimestepBank(num_timesteps, momentum, bins, min_samples)

    def forward(self, losses: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which samples to keep (λ·ℓ_i ≥ m[t_i]) and the bank values they were judged against."""
        threshold = self.bank[t].clone()
        keep = ~self.bank.ready(t) | (self.lam * losses.detach().float() >= threshold)
        self.bank.update(t, losses)
        return keep, threshold

    def closeness(self, losses: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """IET-AGC+: a_i = exp(−5·|λ·ℓ_i − m[t_i]| / m[t_i]); 1 right at the threshold, 0 far from it."""
        distance = (self.lam * losses.detach().float() - threshold).abs() / threshold.clamp_min(1e-12)
        return torch.exp(-5.0 * distance)
