"""Replication thresholds calibrated on real images no model saw, and their false-positive rates measured
on images the calibration did not use.

- **Threshold.** The holdout images (real, never trained on) are split in two halves by a fixed seed
  (`SPLIT_SEED`, not a param: the split is part of the method). Each criterion's threshold is read off the
  first half scored against the training set exactly as a generation is: it flags floor(fpr x n) of them.
- **Held-out rate.** The same threshold applied to the second half: the share of real unseen images it
  flags, with its exact (Clopper-Pearson) 95% interval. On the calibration half that share is
  floor(fpr x n) / n by construction; on the other half it is a measurement, and it can miss the target.
- **Generation null.** Generations that copy nothing of the target pictures (the pretrained model's, for
  the target captions; `lethe calibrate` makes them), scored against the training set at the same
  threshold: the share flagged, with its exact interval. A generation is not a real image, so this is the
  false-positive rate where the threshold is used. The pretrained model may still copy its own
  pretraining images, which the training set holds too: the null counts those as well.
- **Published thresholds.** Each published threshold's rate on all holdout images (none fitted it), with
  its interval, beside the calibrated one.
"""

from __future__ import annotations

import torch
from scipy.stats import beta

from lethe.errors import LetheError

# criterion -> (score key in replication_scores, True when a copy is *below* the threshold)
CRITERIA = {"sim": ("sim", False), "nn_ratio": ("nn_ratio", True), "rel_l2": ("rel_l2", True)}
SPLIT_SEED = 0  # the holdout images' split into a calibration half and a held-out half
CONFIDENCE = 0.95


def threshold_at(scores: torch.Tensor, fpr: float, below: bool) -> float:
    """The threshold that flags floor(fpr x n) of these scores: the k-th smallest (copies below it, strictly)
    or the k-th largest (copies above it), k = floor(fpr x n)."""
    k = int(fpr * len(scores))
    ordered = scores.double().sort(descending=not below).values
    return float(ordered[min(k, len(ordered) - 1)])


def flagged(scores: torch.Tensor, threshold: float, below: bool) -> torch.Tensor:
    return scores < threshold if below else scores > threshold


def exact_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson interval of a share k / n from the beta quantiles: 0 (k = 0) and 1 (k = n) at the
    ends, NaN for no images."""
    if n == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def rate_with_interval(key: str, flags: torch.Tensor) -> dict[str, float]:
    """`key`: the share of True among `flags` (NaN for none); `key/ci_low`, `key/ci_high`: its exact interval."""
    k, n = int(flags.sum()), len(flags)
    low, high = exact_interval(k, n)
    return {key: k / n if n else float("nan"), f"{key}/ci_low": low, f"{key}/ci_high": high}


def split_halves(n: int, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the calibration half (the larger one when n is odd) and of the held-out half, each sorted:
    a random permutation of 0..n-1 from `seed`, cut in two."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = n - n // 2
    return order[:cut].sort().values, order[cut:].sort().values


def calibrate(holdout_scores: dict[str, torch.Tensor], fpr: float, published: dict[str, float],
              seed: int = SPLIT_SEED) -> dict[str, float]:
    """Per criterion: the threshold from the calibration half of the holdout images, its false-positive
    rate on the held-out half with its interval, and the published threshold's rate on all of them."""
    n = len(holdout_scores["rel_l2"])
    if n < 2:
        raise LetheError(f"{n} holdout images: at least 2 are needed, one half to calibrate on and one to measure")
    calibration, heldout = split_halves(n, seed)
    out = {"calibration/fpr_target": fpr, "calibration/holdout_images": float(n),
           "calibration/calibration_images": float(len(calibration)), "calibration/heldout_images": float(len(heldout))}
    for name, (key, below) in CRITERIA.items():
        scores = holdout_scores[key]
        threshold = threshold_at(scores[calibration], fpr, below)
        out[f"calibration/{name}/threshold"] = threshold
        out |= rate_with_interval(f"calibration/{name}/heldout_fpr", flagged(scores[heldout], threshold, below))
        out[f"calibration/{name}/published_threshold"] = published[name]
        out |= rate_with_interval(f"calibration/{name}/published_holdout_fpr", flagged(scores, published[name], below))
    return out


def generation_null(scores: dict[str, torch.Tensor], calibrated: dict[str, float]) -> dict[str, float]:
    """Per criterion: the share of null generations (copies of nothing) its calibrated threshold flags,
    with its interval; `calibrated` is `calibrate`'s output, `scores` the generations' replication scores."""
    out = {"calibration/generation_null_images": float(len(scores["rel_l2"]))}
    for name, (key, below) in CRITERIA.items():
        out |= rate_with_interval(f"calibration/{name}/generation_null_rate",
                                  flagged(scores[key], calibrated[f"calibration/{name}/threshold"], below))
    return out
