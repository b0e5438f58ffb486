"""Scores that flag a memorized prompt, and how well they separate memorized from other prompts.

- Wen et al.: the text-conditional noise magnitude ‖ε̂(x_t, c) − ε̂(x_t, ∅)‖ at the first sampling
  step and its mean over all steps (`SamplingTrace.magnitudes`, free during guided sampling).
- MemAttn (Ren et al.) E: the entropy of the conditional branch's cross-attention over all token
  positions, averaged over heads and pixels, at the first step in one chosen layer (the authors'
  `detect.py`: layer 3 of SD 1.x, `down_blocks.1.attentions.1`).
- MemAttn D, as the authors' `detect.py` computes it: the attention is averaged over *all* layers
  first; D is its entropy averaged over the last fifth of the steps (their last 10 of 50), plus the
  *signed* change of the summary-token entropy (−Σ a ln a over the first end token and the padding
  after it, not renormalised) from the first step to the mean of those last steps.
- NeMo (Hintersdorf et al.): the first-step noise difference δ = ε̂(x_T, T, c) − x_T without
  guidance, min-max normalised per channel, for several seeds; a memorized prompt gives the same δ
  whatever the seed. The similarity is MS-SSIM (3 scales, window 11, betas 0.33, as the authors'
  code) where the latents are large enough for it (at least 44 pixels a side: the stable-diffusion
  preset's 64x64), plain SSIM below (the embedded 16x16). A seed's score is its highest similarity to
  another seed; the prompt's is the highest over seeds.

Higher means "more likely memorized" for every score. AUROC and the TPR at 1% FPR measure detection.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import auc, roc_curve
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)

from lethe.memorization.attention import entropy
from lethe.inference.memattn import through_first_end


def wen_scores(magnitudes: torch.Tensor) -> dict[str, torch.Tensor]:
    """From N x steps magnitudes: the first step's, and the mean over steps."""
    return {"wen_first": magnitudes[:, 0], "wen_all": magnitudes.mean(1)}


def memattn_scores(maps: dict[str, torch.Tensor], ids: torch.Tensor, end_id: int, layer: int) -> dict[str, torch.Tensor]:
    """E and D from per-layer N x steps x tokens attention maps; `layer` indexes the layers in forward order."""
    layers = list(maps)
    e = entropy(maps[layers[layer]][:, 0])
    a = torch.stack([maps[name].float() for name in layers]).mean(0)  # N x steps x tokens, layers averaged first
    steps = a.shape[1]
    last = slice(min(steps - 1, math.floor(0.8 * steps)), steps)
    summary = ~through_first_end(ids, end_id) | (ids == end_id)  # the first end token and the padding after it
    shift = _summary_entropy(a[:, last], summary).mean(1) - _summary_entropy(a[:, 0], summary)  # signed
    return {"memattn_e": e, "memattn_d": entropy(a[:, last]).mean(1) + shift}


def begin_mass(maps: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Per generation, the beginning token's share of the first step's attention in E's layer. MemAttn's
    premise: on Stable Diffusion most attention rests on that token, and a memorized prompt pulls it away."""
    return maps[list(maps)[layer]][:, 0, 0].float()


def _summary_entropy(a: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """-Σ a_i ln a_i over the summary positions only."""
    mask = summary if a.dim() == 2 else summary[:, None, :]
    p = a.float()
    return -(p * p.clamp_min(1e-12).log() * mask).sum(-1)


@torch.no_grad()
def noise_differences(unet, t, x_T: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """δ = ε̂(x_t, t, c) − x_t per row, min-max normalised to [0, 1] per row and channel (as NeMo's code)."""
    delta = (unet(x_T, t, encoder_hidden_states=states).sample - x_T).float()
    low, high = delta.amin((-2, -1), keepdim=True), delta.amax((-2, -1), keepdim=True)
    return (delta - low) / (high - low).clamp_min(1e-12)


MS_SSIM_KERNEL, MS_SSIM_BETAS = 11, (0.33, 0.33, 0.33)  # NeMo's settings


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NeMo's similarity of N x C x H x W noise differences in [0, 1], one value per row: MS-SSIM where the
    images are large enough for its three scales, plain SSIM (window up to 11) below."""
    size = min(a.shape[-2:])
    if size // 2 ** (len(MS_SSIM_BETAS) - 1) > MS_SSIM_KERNEL - 1:  # torchmetrics' own bound
        return multiscale_structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                                              betas=MS_SSIM_BETAS, reduction="none")
    kernel = min(MS_SSIM_KERNEL, size if size % 2 else size - 1)
    return structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel, reduction="none")


def seed_pairs(seeds: int) -> tuple[list[int], list[int]]:
    """Every unordered pair of seeds i < j."""
    pairs = [(i, j) for i in range(seeds) for j in range(i + 1, seeds)]
    return [i for i, _ in pairs], [j for _, j in pairs]


def pairwise_similarities(delta: torch.Tensor) -> torch.Tensor:
    """For P x S x C x H x W noise differences: P x S(S−1)/2, the similarity of every pair of seeds."""
    p, s = delta.shape[:2]
    i, j = seed_pairs(s)
    return similarity(delta[:, i].flatten(0, 1), delta[:, j].flatten(0, 1)).view(p, len(i))


def seed_max_similarity(pairwise: torch.Tensor, seeds: int) -> torch.Tensor:
    """P x S: each seed's highest similarity to another seed, from `pairwise_similarities`."""
    out = torch.full((len(pairwise), seeds), float("-inf"), device=pairwise.device)
    for column, (i, j) in enumerate(zip(*seed_pairs(seeds))):
        out[:, i] = torch.maximum(out[:, i], pairwise[:, column])
        out[:, j] = torch.maximum(out[:, j], pairwise[:, column])
    return out


def detection_quality(scores: np.ndarray, memorized: np.ndarray) -> dict[str, float]:
    """AUROC and the TPR at 1% FPR; NaN when one class is missing."""
    scores, memorized = np.asarray(scores, dtype=float), np.asarray(memorized, dtype=bool)
    if memorized.all() or not memorized.any():
        return {"auroc": float("nan"), "tpr_at_1pct_fpr": float("nan")}
    fpr, tpr, _ = roc_curve(memorized, scores)
    return {"auroc": float(auc(fpr, tpr)), "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max())}


@torch.no_grad()
def nemo_pairwise(unet, t, noise: torch.Tensor, states: torch.Tensor, rows_per_batch: int = 512) -> torch.Tensor:
    """P x S(S−1)/2 pairwise similarities: states P x L x D, noise S x C x H x W (the same seeds for every prompt)."""
    s = len(noise)
    per_batch = max(1, rows_per_batch // s)
    out = []
    for start in range(0, len(states), per_batch):
        chunk = states[start : start + per_batch]
        x = noise.repeat(len(chunk), 1, 1, 1)
        delta = noise_differences(unet, t, x, chunk.repeat_interleave(s, 0))
        out.append(pairwise_similarities(delta.view(len(chunk), s, *delta.shape[1:])).cpu())
    return torch.cat(out)


def nemo_scores(unet, t, noise: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """NeMo's detection score per prompt: the highest similarity between the noise differences of two seeds."""
    return nemo_pairwise(unet, t, noise, states).max(1).values
