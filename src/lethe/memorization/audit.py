"""Which training images does a model reproduce, and from which prompts? The algorithm of `lethe audit`.

1. **Screen.** Every prompt (each training caption, and any extra prompt) gets Wen et al.'s one-step
   detector: the text-conditional noise magnitude ‖ε̂(x_T, c) − ε̂(x_T, ∅)‖ at the sampler's first step,
   averaged over `screen_seeds` starting noises. One guided U-Net pass per seed instead of a whole sampling.
2. **Select.** Full mode: every prompt. Screen mode: the highest-scoring `generate_share` of the prompts,
   plus `random_share` of the rest drawn at random, which estimates what the screen missed.
3. **Generate** up to K images per selected prompt, seed `prompt index x K + round`, so a screen-mode
   generation is the very image full mode makes for that prompt and seed. In screen mode a prompt stops at
   its first copy: one copy answers the question for its image.
4. **Judge.** A generation g and a training image i are compared by relative L2 (Carlini et al.; the
   evaluation's criterion): d(g, i) over the mean distance from g to its n nearest training images. An
   image's score is the lowest over all generations; it is reproduced when that is below the threshold.
   Only g's n nearest can fall below a threshold under 1 (d(g, i) >= the mean beyond them), so the search
   keeps those. The threshold flags `fpr / K` of held-out real images scored the same way: each of an
   image's up to K generations then passes by chance with probability at most fpr / K, so an image never
   memorized is flagged with probability at most `fpr` (the union bound). Without held-out images, the
   published threshold applies and its false-positive rate on this data is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binomtest

from lethe.memorization.neighbors import nearest_neighbors

ALPHA = 0.05


@dataclass
class Judged:
    """Every generation's n nearest training images, and its relative L2 to each of them."""

    prompt: list[int] = field(default_factory=list)  # per generation: the index of its prompt
    seed: list[int] = field(default_factory=list)
    nearest: list[torch.Tensor] = field(default_factory=list)  # per batch: G x n training-image indices
    relative: list[torch.Tensor] = field(default_factory=list)  # per batch: G x n relative L2

    def add(self, prompts: list[int], seeds: list[int], images: torch.Tensor, train: torch.Tensor, n: int,
            chunk_size: int = 65536) -> torch.Tensor:
        """Judge a batch; returns each generation's lowest relative L2 (its nearest image's)."""
        d, i = nearest_neighbors(images, train, k=n, chunk_size=chunk_size)
        relative = d / d.mean(1, keepdim=True).clamp_min(1e-12)
        self.prompt += prompts
        self.seed += seeds
        self.nearest.append(i)
        self.relative.append(relative)
        return relative[:, 0]

    def __len__(self) -> int:
        return len(self.prompt)

    def per_image(self, n_images: int, keep: int = 3) -> list[list[tuple[int, float]]]:
        """Per training image, its `keep` closest generations as (generation index, relative L2), closest first."""
        closest: list[list[tuple[int, float]]] = [[] for _ in range(n_images)]
        if not self.nearest:
            return closest
        images = torch.cat(self.nearest).numpy()
        relative = torch.cat(self.relative).numpy()
        generation = np.repeat(np.arange(len(images)), images.shape[1])
        images, relative = images.ravel(), relative.ravel()
        for k in np.argsort(relative, kind="stable"):
            found = closest[images[k]]
            if len(found) < keep:
                found.append((int(generation[k]), float(relative[k])))
        return closest


def relative_l2_of_nearest(images: torch.Tensor, train: torch.Tensor, n: int, chunk_size: int = 65536) -> torch.Tensor:
    """Each image's relative L2 to its nearest training image: how held-out real images calibrate the threshold."""
    d, _ = nearest_neighbors(images, train, k=n, chunk_size=chunk_size)
    return d[:, 0] / d.mean(1).clamp_min(1e-12)


def calibrated_threshold(holdout_scores: torch.Tensor, fpr: float, generations_per_prompt: int) -> float:
    """The value that flags floor(fpr / K x n) of the held-out images (the k-th smallest, copies strictly below)."""
    from lethe.memorization.calibration import threshold_at

    return threshold_at(holdout_scores, fpr / generations_per_prompt, below=True)


def select(scores: np.ndarray, generate_share: float, random_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Screen mode's prompts: the top `generate_share` by score, and `random_share` of the rest at random."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    top = order[: int(np.ceil(generate_share * len(order)))]
    rest = order[len(top):]
    drawn = np.random.default_rng(seed).permutation(rest)[: int(np.ceil(random_share * len(rest)))]
    return np.sort(top), np.sort(drawn)


def binomial_interval(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval of a share k / n: exact, and honest at 0 of a few."""
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - ALPHA, method="exact")
    return float(ci.low), float(ci.high)


def share_with_interval(key: str, flags: np.ndarray) -> dict[str, float]:
    """`key`: the share of True among `flags`; `key/ci_low`, `key/ci_high`: its exact 95% interval."""
    low, high = binomial_interval(int(flags.sum()), len(flags))
    return {key: float(flags.mean()), f"{key}/ci_low": low, f"{key}/ci_high": high}


def reproduced_share(reproduced: np.ndarray, top: np.ndarray | None, drawn: np.ndarray | None) -> dict[str, float]:
    """The share of training images reproduced, with its 95% interval.

    Full mode (top is None): every image had its prompt generated; the exact binomial interval over images.
    Screen mode: the images found among the screened-in prompts are counted; the rest is estimated from the
    random sample of it, whose exact interval, scaled to the rest's size, is the interval of what was missed.
    """
    n = len(reproduced)
    if top is None:
        return share_with_interval("audit/reproduced_share", reproduced)
    rest = n - len(top)
    unsampled = rest - len(drawn)
    found = int(reproduced[top].sum()) + int(reproduced[drawn].sum())
    sampled = int(reproduced[drawn].sum())
    share = sampled / len(drawn) if len(drawn) else 0.0
    low, high = binomial_interval(sampled, len(drawn)) if len(drawn) else (0.0, 1.0)
    return {
        "audit/reproduced_share": (found + unsampled * share) / n,
        "audit/reproduced_share/ci_low": (found + unsampled * low) / n,
        "audit/reproduced_share/ci_high": (found + unsampled * high) / n,
        "audit/missed_estimate": unsampled * share,  # images of prompts neither screened in nor sampled
        "audit/missed_estimate/ci_low": unsampled * low,
        "audit/missed_estimate/ci_high": unsampled * high,
    }
