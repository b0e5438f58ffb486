"""A running statistic per range of timesteps: the memory that anti-gradient control and Wen's filter judge samples by.

One entry per timestep sees a handful of samples in a whole fine-tune: its running mean, started at 0,
stays far from the typical value, and the filter judges by its own warm-up. So the statistic is kept
per range of timesteps (`bins`, as MemAttn's filter keeps its entropy statistics), its first
`min_samples` samples are pooled exactly (a plain mean, no zero start), and a range judges nothing
until it has seen them (`ready`). After that it follows the samples with `momentum`.
"""

from __future__ import annotations

import torch
from torch import nn


class TimestepBank(nn.Module):
    """Per range of timesteps: samples seen and the running mean (saved buffers, so a resumed run keeps them)."""

    def __init__(self, num_timesteps: int, momentum: float = 0.8, bins: int = 10, min_samples: int = 32):
        super().__init__()
        self.momentum, self.min_samples = momentum, min_samples
        self.bin_width = -(-num_timesteps // bins)
        self.register_buffer("seen", torch.zeros(bins))
        self.register_buffer("values", torch.zeros(bins))

    def bins(self, t: torch.Tensor) -> torch.Tensor:
        return (t // self.bin_width).clamp_max(len(self.values) - 1)

    def __getitem__(self, t: torch.Tensor) -> torch.Tensor:
        return self.values[self.bins(t)]

    def ready(self, t: torch.Tensor) -> torch.Tensor:
        """Which samples fall in a range that has seen enough to judge."""
        return self.seen[self.bins(t)] >= self.min_samples

    @torch.no_grad()
    def update(self, t: torch.Tensor, x: torch.Tensor) -> None:
        """One sample after another: an exact mean over a range's first `min_samples`, then
        m <- momentum·m + (1 − momentum)·x."""
        values, seen = self.values.cpu(), self.seen.cpu()  # one copy each way, not a device sync per sample
        for b, xi in zip(self.bins(t).tolist(), x.detach().float().tolist()):
            n = seen[b].item()
            values[b] = values[b] + (xi - values[b]) / (n + 1) if n < self.min_samples else (
                self.momentum * values[b] + (1 - self.momentum) * xi)
            seen[b] = n + 1
        self.values.copy_(values)
        self.seen.copy_(seen)
