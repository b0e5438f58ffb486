"""MemAttn's training-time mitigation (Ren et al., ECCV 2024): skip samples with abnormal attention entropy.

A sample the model is starting to memorize pulls cross-attention off the beginning token onto a few
trigger tokens, which raises the entropy of the attention over token positions. The forward pass
already computes those maps: the chosen layer's entropy per sample is read from it (no extra pass),
and a sample is skipped when its entropy is above the running mean plus z running standard
deviations. The threshold is not published; z is a param. Every sample updates the running
statistics, kept or not, and nothing is skipped before the first batch has set them.
"""

from __future__ import annotations

import torch
from torch import nn

from lethe.memorization.attention import attention_control, entropy
from lethe.training.module import DiffusionTraining


class EntropyFilter(nn.Module):
    """Running mean and variance of the entropy as buffers, so a resumed run keeps them."""

    def __init__(self, z: float, momentum: float):
        super().__init__()
        self.z, self.momentum = z, momentum
        self.register_buffer("stats", torch.zeros(3))  # started (0/1), mean, variance

    @torch.no_grad()
    def forward(self, entropies: torch.Tensor) -> torch.Tensor:
        """Which samples to keep; then fold every sample into the running mean and variance."""
        h = entropies.detach().float().to(self.stats.device)
        started, mean, var = self.stats
        if not started:
            self.stats.copy_(torch.stack([torch.ones(()), h.mean(), h.var(unbiased=False)]))
            return torch.ones(len(h), dtype=torch.bool, device=h.device)
        keep = h <= mean + self.z * var.sqrt()
        m = self.momentum
        mean = m * mean + (1 - m) * h.mean()
        var = m * var + (1 - m) * ((h - mean) ** 2).mean()
        self.stats.copy_(torch.stack([started, mean, var]))
        return keep


class MemAttnFilteredTraining(DiffusionTraining):
    def __init__(self, model, noise_scheduler, cfg, layer: int, z: float, momentum: float):
        super().__init__(model, noise_scheduler, cfg)
        self.layer = layer
        self.filter = EntropyFilter(z, momentum)

    def denoise(self, batch, model=None, t=None):
        control = attention_control(model or self.model)
        if self.layer >= len(control.layers):
            raise ValueError(f"memattn_filter.layer {self.layer}: the U-Net has {len(control.layers)} cross-attention layers")
        with control.capturing():
            d = super().denoise(batch, model, t)
            d.entropy = entropy(control.captured[control.layers[self.layer]])
        return d

    def select(self, d, batch, model):
        return self.filter(d.entropy).to(d.losses.device)
