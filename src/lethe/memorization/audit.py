"""Which training images does a model reproduce, and from which prompts? The algorithm of `lethe audit`.

1. **Screen.** Every prompt (each training caption, and any extra prompt) gets Wen et al.'s one-step
   detector: the text-conditional noise magnitude ‖ε̂(x_T, c) − ε̂(x_T, ∅)‖ at the sampler's first step,
   averaged over `screen_seeds` starting noises. One guided U-Net pass per seed instead of a whole sampling.
2. **Select.** Full mode: every prompt. Screen mode: the highest-scoring `generate_share` of the prompts,
   plus `random_share` of the rest drawn at random, which estimates what the screen missed.
3. **Generate** images for each selected prompt, seed `prompt index x K + round`, so a screen-mode
   generation is the very image full mode makes for that prompt and seed: K per prompt in full mode; in
   screen mode at most `screen_generations`, and a prompt stops at its first copy (one copy answers the
   question for its image).
4. **Judge.** A generation g and a training image i are compared by relative L2 (Carlini et al.; the
   evaluation's criterion): d(g, i) over the mean distance from g to its n nearest training images. An
   image's score is the lowest over all generations; it is reproduced when that is below the threshold.
   Only g's n nearest can fall below a threshold under 1 (d(g, i) >= the mean beyond them), so the search
   keeps those. The threshold is calibrated on held-out real images scored the same way, at the rate
   alpha = fpr x images / (prompts x K): a generation that copies nothing passes with probability at most
   alpha (the conformal bound below), full mode makes prompts x K generations, so the expected number of
   images flagged by chance is at most fpr x images (one passing generation flags one image, or several
   near-identical ones). Without held-out images, the published threshold applies and its false-positive
   rate on this data is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binomtest

from lethe.errors import LetheError
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


def calibrated_threshold(holdout_scores: torch.Tensor, alpha: float, where: str = "held-out images") -> float:
    """The k-th smallest held-out score, k = floor(alpha (n + 1)), copies strictly below it: a new image
    exchangeable with the held-out ones falls below it with probability k / (n + 1) <= alpha (the
    split-conformal bound). Too few held-out images for alpha (k = 0) is an error, not a silent guess."""
    n = len(holdout_scores)
    k = int(np.floor(alpha * (n + 1) + 1e-9))
    if k < 1:
        raise LetheError(f"{where}: {n} held-out images cannot calibrate a per-generation rate of {alpha:.4f}; "
                         f"give at least {int(np.ceil(1 / alpha)) - 1}, or raise audit.fpr")
    return float(holdout_scores.double().sort().values[k - 1])


def generation_rate(fpr: float, images: int, prompts: int, generations_per_prompt: int) -> float:
    """alpha: the per-generation rate that keeps the expected share of images flagged by chance at fpr."""
    return min(1.0, fpr * images / (prompts * generations_per_prompt))


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


def reproduced_share(reproduced: np.ndarray, screened: np.ndarray | None, sampled: np.ndarray | None) -> dict[str, float]:
    """The share of training images reproduced, with its 95% interval (images by index).

    Full mode (screened is None): every image had its prompt generated; the exact interval over images.
    Screen mode: every image found counts. The images neither screened in nor sampled, and not found anyway
    (another prompt's generation may copy an image), are estimated from the random sample of the rest:
    the share of its images reproduced, with its exact interval, times their number. Without a sample,
    nothing is known of them: the interval runs to all of them.
    """
    n = len(reproduced)
    if screened is None:
        return share_with_interval("audit/reproduced_share", reproduced)
    found = int(reproduced.sum())
    unseen = np.ones(n, dtype=bool)
    unseen[screened], unseen[sampled] = False, False
    unknown = int((unseen & ~reproduced).sum())
    if len(sampled):
        rate = float(reproduced[sampled].mean())
        low, high = binomial_interval(int(reproduced[sampled].sum()), len(sampled))
    else:
        rate, low, high = float("nan"), 0.0, 1.0
    return {
        "audit/reproduced_share": (found + unknown * (0.0 if np.isnan(rate) else rate)) / n,
        "audit/reproduced_share/ci_low": (found + unknown * low) / n,
        "audit/reproduced_share/ci_high": (found + unknown * high) / n,
        "audit/missed_estimate": unknown * rate,  # NaN without a random sample
        "audit/missed_estimate/ci_low": unknown * low,
        "audit/missed_estimate/ci_high": unknown * high,
    }
