"""IET-AGC (Liu et al., ECCV 2024) and IET-AGC+ (Guan et al., 2025): an ensemble of proxies on shards.

The training set is split into K shards; K proxy models start from the same weights, each with its
own optimizer state (one AdamW over all proxies: only the step's proxy has gradients, and AdamW keeps
per-parameter state) and its own anti-gradient-control bank. Step s belongs to proxy
(s // local_steps) mod K, so a round is K·local_steps steps. After each round the proxies' weights are
averaged, weighted by shard size, and copied back into every proxy. IET-AGC+ instead redistributes
memory samples on alternate rounds (the most-skipped share of each shard moves to the next shard in a
ring) and augments kept samples near the threshold.

EMA: Lightning's callback keeps an EMA of every proxy. Averaging the proxies' EMAs after each round
leaves their weighted mean unchanged (the EMA is linear and the weights are constant), so the merged
EMA at the end, the weighted mean of the proxies' EMAs, is the same as averaging them every round.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lethe.models.diffusion_model import DiffusionModel
from lethe.training.agc import AntiGradientControl
from lethe.training.module import Denoised, DiffusionTraining


@torch.no_grad()
def average_into(models: list[nn.Module], weights: list[float]) -> None:
    """Set every model's parameters to the weighted mean of all of theirs."""
    total = float(sum(weights))
    for params in zip(*(m.parameters() for m in models)):
        mean = sum(w / total * p.detach() for w, p in zip(weights, params))
        for p in params:
            p.copy_(mean)


def redistribute(assignment: np.ndarray, skips: np.ndarray, shards: int, share: float) -> np.ndarray:
    """Move each shard's most-skipped samples to the next shard in a ring; every shard keeps its size.

    Each shard hands over and receives the same number: `share` of the smallest shard.
    """
    members = [np.flatnonzero(assignment == k) for k in range(shards)]
    n = int(share * min(len(m) for m in members))
    moved = assignment.copy()
    for k, m in enumerate(members):
        most_skipped = m[np.argsort(-skips[m], kind="stable")[:n]]
        moved[most_skipped] = (k + 1) % shards
    return moved


def shift_images(images: torch.Tensor, shifts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by up to its `shifts[i]` pixels in x and y, edges replicated.

    Small translations suit 16x16 digits: they keep the digit legible, unlike flips or big rotations.
    """
    pad = int(shifts.max().item())
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    size = images.shape[-1]
    out = torch.empty_like(images)
    for i, limit in enumerate(shifts.tolist()):
        dy, dx = (torch.randint(-limit, limit + 1, (2,), generator=generator) + pad).tolist()
        out[i] = padded[i, :, dy : dy + images.shape[-2], dx : dx + size]
    return out


def _proxy_copy(model: DiffusionModel) -> DiffusionModel:
    """A proxy with its own U-Net (and text encoder if trained); frozen parts are shared, not copied."""
    trained_text = any(p.requires_grad for p in model.text_encoder.parameters())
    text = copy.deepcopy(model.text_encoder) if trained_text else model.text_encoder
    return DiffusionModel(copy.deepcopy(model.unet), text, model.vae, dataclasses.replace(model.spec))


class ProxyEnsemble(DiffusionTraining):
    def __init__(self, model, noise_scheduler, cfg, *, assignment: np.ndarray, local_steps: int, agc_lambda: float,
                 bank_momentum: float = 0.8, bank_bins: int = 10, bank_min_samples: int = 32,
                 msr_share: float | None = None, taa_max_shift: int = 0, agc: bool = True, keep=None):
        super().__init__(model, noise_scheduler, cfg, keep=keep)
        self.shards = int(assignment.max()) + 1
        self.local_steps, self.msr_share, self.taa_max_shift = local_steps, msr_share, taa_max_shift
        self.use_agc = agc  # False: every sample kept (the ablation); the banks still follow the losses
        # `keep` (the random-skip control): a blind choice replaces the banks'; they still follow the losses,
        # so IET-AGC+'s augmentation and redistribution work as in the method controlled
        self.proxies = nn.ModuleList([model] + [_proxy_copy(model) for _ in range(self.shards - 1)])
        timesteps = noise_scheduler.config.num_train_timesteps
        self.agc = nn.ModuleList(AntiGradientControl(timesteps, agc_lambda, bank_momentum, bank_bins, bank_min_samples)
                                 for _ in range(self.shards))
        self.register_buffer("assignment", torch.as_tensor(assignment, dtype=torch.long))
        self.register_buffer("skips", torch.zeros(len(assignment), dtype=torch.long))
        # this round's samples seen and skipped (logged at its end), kept in checkpoints for a resume mid-round
        self.register_buffer("round_counts", torch.zeros(2, dtype=torch.long))

    def proxy_index(self, step: int) -> int:
        return (step // self.local_steps) % self.shards

    def model_for_step(self, step: int) -> DiffusionModel:
        return self.proxies[self.proxy_index(step)]

    def batch_pool(self, step: int, size: int) -> np.ndarray:
        return np.flatnonzero(self.assignment.cpu().numpy() == self.proxy_index(step))

    def select(self, d: Denoised, batch: dict, model) -> torch.Tensor:
        agc = self.agc[self.proxy_index(self.current_step)]
        self._ready = agc.bank.ready(d.t)  # before the bank takes this batch in
        keep, self._threshold = agc(d.losses, d.t)
        if self.keep is not None:  # the random-skip control: as many skipped, chosen blindly
            keep = super().select(d, batch, model)
        elif not self.use_agc:
            keep = torch.ones_like(keep)
        self.skips[batch["index"][~keep]] += 1
        self.round_counts += torch.tensor([len(keep), int((~keep).sum())], device=self.round_counts.device)
        return keep

    def kept_loss(self, d: Denoised, keep: torch.Tensor, batch: dict, model) -> torch.Tensor:
        """IET-AGC+'s threshold-aware augmentation: kept samples near the threshold are re-drawn shifted."""
        losses = d.losses[keep]
        if not self.taa_max_shift:
            return losses.mean()
        agc = self.agc[self.proxy_index(self.current_step)]
        # a range that has not seen min_samples judges nothing, so it augments nothing either
        closeness = agc.closeness(losses, self._threshold[keep]) * self._ready[keep]
        augment = torch.rand(len(losses), device=losses.device) < closeness.mean()  # batch strength
        if augment.any():
            rows = keep.nonzero().flatten()[augment]
            shifts = torch.ceil(closeness[augment] * self.taa_max_shift).long().cpu()
            key = "latents" if "latents" in batch else "images"  # latent path: cached latents are shifted
            shifted = {key: shift_images(batch[key][rows], shifts), "ids": batch["ids"][rows]}
            losses = torch.cat([losses[~augment], self.denoise(shifted, model, t=d.t[rows]).losses])
        self.log("train/augmented_share", augment.float().mean())
        return losses.mean()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        step = int(batch["step"][0])
        round_length = self.local_steps * self.shards
        if (step + 1) % round_length:
            return
        round_index = (step + 1) // round_length  # 1, 2, ...
        self.log("round/index", float(round_index))
        seen, skipped = self.round_counts.tolist()
        self.log("round/skipped_share", skipped / max(1, seen))
        self.log("round/proxy_spread", self.proxy_spread())
        self.round_counts.zero_()
        if self.msr_share is not None and round_index % 2 == 0:
            before = self.assignment.cpu().numpy()
            after = redistribute(before, self.skips.cpu().numpy(), self.shards, self.msr_share)
            self.assignment.copy_(torch.as_tensor(after))
            self.skips.zero_()
            self.log("round/moved_samples", float((before != after).sum()))
        else:
            average_into(list(self.proxies), self.shard_sizes())

    def shard_sizes(self) -> list[float]:
        return torch.bincount(self.assignment, minlength=self.shards).float().tolist()

    @torch.no_grad()
    def proxy_spread(self) -> float:
        """Mean distance of the proxies' weights from their mean: how far they drifted this round."""
        flat = torch.stack([torch.cat([p.flatten() for p in m.unet.parameters()]) for m in self.proxies])
        return (flat - flat.mean(0)).norm(dim=1).mean().item()

    def trained_model(self) -> DiffusionModel:
        average_into(list(self.proxies), self.shard_sizes())
        return self.proxies[0]
