"""Scores that flag a memorized prompt, and how well they separate memorized from other prompts.

- Wen et al.: the text-conditional noise magnitude ‖ε̂(x_t, c) − ε̂(x_t, ∅)‖ at the first sampling
  step and its mean over all steps (`SamplingTrace.magnitudes`, free during guided sampling).
- MemAttn (Ren et al.) E: the entropy of the conditional branch's cross-attention over token
  positions, averaged over heads and pixels, at the first step in one chosen layer.
- MemAttn D: the mean entropy over all layers in the last fifth of the steps, plus, per layer, how
  far the entropy restricted to the summary tokens (the first end token and the padding after it)
  moved between the first step and those last steps (its absolute change; the paper leaves the sign
  open, the magnitude of the shift is what separates).
- NeMo (Hintersdorf et al.): the first-step noise difference δ = ε̂(x_T, T, c) − x_T without
  guidance, min-max normalised, for several seeds; a memorized prompt gives the same δ whatever the
  seed, so its score is the highest SSIM between the δ of two different seeds.

Higher means "more likely memorized" for every score. AUROC and the TPR at 1% FPR measure detection.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import auc, roc_curve
from torchmetrics.functional.image import structural_similarity_index_measure

from lethe.memorization.attention import entropy
from lethe.inference.memattn import through_first_end


def wen_scores(magnitudes: torch.Tensor) -> dict[str, torch.Tensor]:
    """From N x steps magnitudes: the first step's, and the mean over steps."""
    return {"wen_first": magnitudes[:, 0], "wen_all": magnitudes.mean(1)}


def memattn_scores(maps: dict[str, torch.Tensor], ids: torch.Tensor, end_id: int, layer: int) -> dict[str, torch.Tensor]:
    """E and D from per-layer N x steps x tokens attention maps; `layer` indexes the layers in forward order."""
    layers = list(maps)
    e = entropy(maps[layers[layer]][:, 0])
    steps = next(iter(maps.values())).shape[1]
    last = slice(min(steps - 1, math.floor(0.8 * steps)), steps)
    summary = ~through_first_end(ids, end_id) | (ids == end_id)  # the first end token and the padding after it
    mean_entropy = torch.stack([entropy(maps[name][:, last]).mean(1) for name in layers]).mean(0)
    shift = torch.stack([
        (_summary_entropy(maps[name][:, last], summary).mean(1) - _summary_entropy(maps[name][:, 0], summary)).abs()
        for name in layers
    ]).mean(0)
    return {"memattn_e": e, "memattn_d": mean_entropy + shift}


def _summary_entropy(a: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """-Σ a_i ln a_i over the summary positions only."""
    mask = summary if a.dim() == 2 else summary[:, None, :]
    p = a.float()
    return -(p * p.clamp_min(1e-12).log() * mask).sum(-1)


@torch.no_grad()
def noise_differences(unet, t, x_T: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """δ = ε̂(x_T, t, c) − x_T per row, min-max normalised to [0, 1] per row."""
    delta = (unet(x_T, t, encoder_hidden_states=states).sample - x_T).float()
    flat = delta.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(delta)


def max_cross_seed_ssim(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """For P x S x C x H x W noise differences: per row of P, the highest SSIM(a_i, b_j) over seeds i ≠ j."""
    b = a if b is None else b
    p, s = a.shape[:2]
    i, j = zip(*[(i, j) for i in range(s) for j in range(s) if i != j])
    first, second = a[:, list(i)].flatten(0, 1), b[:, list(j)].flatten(0, 1)
    size = a.shape[-1]
    kernel = min(11, size if size % 2 else size - 1)
    ssim = structural_similarity_index_measure(first, second, data_range=1.0, kernel_size=kernel, reduction="none")
    return ssim.view(p, len(i)).max(1).values


def detection_quality(scores: np.ndarray, memorized: np.ndarray) -> dict[str, float]:
    """AUROC and the TPR at 1% FPR; NaN when one class is missing."""
    scores, memorized = np.asarray(scores, dtype=float), np.asarray(memorized, dtype=bool)
    if memorized.all() or not memorized.any():
        return {"auroc": float("nan"), "tpr_at_1pct_fpr": float("nan")}
    fpr, tpr, _ = roc_curve(memorized, scores)
    return {"auroc": float(auc(fpr, tpr)), "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max())}


@torch.no_grad()
def nemo_scores(unet, t, noise: torch.Tensor, states: torch.Tensor, rows_per_batch: int = 512) -> torch.Tensor:
    """NeMo's score per prompt: states P x L x D, noise S x C x H x W (one start per seed, the same for every prompt)."""
    s = len(noise)
    per_batch = max(1, rows_per_batch // s)
    out = []
    for start in range(0, len(states), per_batch):
        chunk = states[start : start + per_batch]
        x = noise.repeat(len(chunk), 1, 1, 1)
        delta = noise_differences(unet, t, x, chunk.repeat_interleave(s, 0))
        out.append(max_cross_seed_ssim(delta.view(len(chunk), s, *delta.shape[1:])))
    return torch.cat(out)
