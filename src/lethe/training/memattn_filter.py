"""MemAttn's training-time mitigation (Ren et al., ECCV 2024): skip samples with abnormal attention entropy.

A sample the model is starting to memorize pulls cross-attention off the beginning token onto a few
trigger tokens, which raises the entropy of the attention over token positions. The forward pass
already computes those maps: the chosen layer's entropy per sample is read from it (no extra pass),
and a sample is skipped when its entropy is above the running mean plus z running standard
deviations of its timestep range. The threshold is not published; z is a param.

- Entropy falls steadily with the noise level, more than any prompt moves it, so the statistics are
  kept per range of timesteps (`timestep_bins`), as Wen's filter keeps its bank per timestep.
- Rows whose caption was dropped (classifier-free guidance) attend over an empty prompt: they are
  neither judged nor folded into the statistics, which they would otherwise inflate.
- Every judged sample updates its range's statistics, kept or not; a range judges nothing until it
  has seen `warmup` samples, since a mean and variance from one or two rows would skip at random.
- Under DDP every rank judges the whole global batch (gathered), so the statistics, and which samples
  are skipped, do not depend on the number of processes.
"""

from __future__ import annotations

import torch
from torch import nn

from lethe.memorization.attention import attention_control, entropy
from lethe.training.module import DiffusionTraining


class EntropyFilter(nn.Module):
    """Running mean and variance of the entropy per timestep range, as buffers so a resumed run keeps them."""

    def __init__(self, z: float, momentum: float, num_timesteps: int = 1000, bins: int = 1, warmup: int = 8):
        super().__init__()
        self.z, self.momentum, self.warmup = z, momentum, warmup
        self.bin_width = -(-num_timesteps // bins)
        self.register_buffer("stats", torch.zeros(bins, 3))  # per range: samples seen, mean, variance

    @torch.no_grad()
    def forward(self, entropies: torch.Tensor, t: torch.Tensor | None = None,
                judged: torch.Tensor | None = None) -> torch.Tensor:
        """Which samples to keep; then fold the judged ones into their range's running mean and variance."""
        # on the CPU: one copy each way per step, not a device sync per timestep range
        h = entropies.detach().float().cpu()
        t = torch.zeros(len(h), dtype=torch.long) if t is None else t.cpu()
        judged = torch.ones(len(h), dtype=torch.bool) if judged is None else judged.cpu()
        keep = torch.ones(len(h), dtype=torch.bool)
        stats = self.stats.cpu()
        bins = (t // self.bin_width).clamp_max(len(stats) - 1)
        for b in bins[judged].unique().tolist():
            rows = judged & (bins == b)
            x = h[rows]
            seen, mean, var = stats[b].tolist()
            if seen < self.warmup:  # pool the first samples exactly: plain mean and variance
                total = seen + len(x)
                new_mean = (seen * mean + x.sum().item()) / total
                var = (seen * (var + (mean - new_mean) ** 2) + ((x - new_mean) ** 2).sum().item()) / total
                stats[b] = torch.tensor([total, new_mean, var])
                continue
            keep[rows] = x <= mean + self.z * var**0.5
            m = self.momentum
            mean = m * mean + (1 - m) * x.mean().item()
            var = m * var + (1 - m) * ((x - mean) ** 2).mean().item()
            stats[b] = torch.tensor([seen + len(x), mean, var])
        self.stats.copy_(stats)
        return keep


class MemAttnFilteredTraining(DiffusionTraining):
    def __init__(self, model, noise_scheduler, cfg, layer: int, z: float, momentum: float, timestep_bins: int = 10):
        super().__init__(model, noise_scheduler, cfg)
        self.layer = layer
        self.filter = EntropyFilter(z, momentum, noise_scheduler.config.num_train_timesteps, timestep_bins)

    def denoise(self, batch, model=None, t=None):
        control = attention_control(model or self.model)
        if self.layer >= len(control.layers):
            raise ValueError(f"memattn_filter.layer {self.layer}: the U-Net has {len(control.layers)} cross-attention layers")
        with control.capturing():
            d = super().denoise(batch, model, t)
            d.entropy = entropy(control.captured[control.layers[self.layer]])
        return d

    def select(self, d, batch, model):
        entropies, t, judged = d.entropy, d.t, ~d.dropped
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            entropies, t, judged = (self.all_gather(x).flatten(0, 1) for x in (entropies, t, judged.int()))
            return self.filter(entropies, t, judged.bool())[self.global_rows(len(d.t))[1]].to(d.losses.device)
        return self.filter(entropies, t, judged).to(d.losses.device)
