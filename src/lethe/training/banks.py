"""A running statistic per timestep: the memory that anti-gradient control and Wen's filter judge samples by."""

from __future__ import annotations

import torch
from torch import nn


class TimestepBank(nn.Module):
    """A running mean of some per-sample quantity for each timestep, starting at 0 (a saved buffer)."""

    def __init__(self, num_timesteps: int, momentum: float = 0.8):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("values", torch.zeros(num_timesteps))

    def __getitem__(self, t: torch.Tensor) -> torch.Tensor:
        return self.values[t]

    @torch.no_grad()
    def update(self, t: torch.Tensor, x: torch.Tensor) -> None:
        """m[t_i] <- momentum·m[t_i] + (1 − momentum)·x_i, one sample after another (t may repeat)."""
        for ti, xi in zip(t.tolist(), x.detach().float().tolist()):
            self.values[ti] = self.momentum * self.values[ti] + (1 - self.momentum) * xi
