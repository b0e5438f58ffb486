"""Replication thresholds calibrated on real images no model saw.

A criterion's threshold is read off the holdout *images* (real, never trained on) scored against the
training set exactly as a generation is: the threshold flags `fpr` of them. A generation is then called
a copy when it is closer to a training image than all but that share of real unseen images are, so the
false-positive rate on unseen images is the one chosen, whatever the feature space or the dataset.
"""

from __future__ import annotations

import torch

# criterion -> (score key in replication_scores, True when a copy is *below* the threshold)
CRITERIA = {"sim": ("sim", False), "nn_ratio": ("nn_ratio", True), "rel_l2": ("rel_l2", True)}


def threshold_at(scores: torch.Tensor, fpr: float, below: bool) -> float:
    """The threshold that flags floor(fpr x n) of these scores: the k-th smallest (copies below it, strictly)
    or the k-th largest (copies above it), k = floor(fpr x n)."""
    k = int(fpr * len(scores))
    ordered = scores.double().sort(descending=not below).values
    return float(ordered[min(k, len(ordered) - 1)])


def flagged(scores: torch.Tensor, threshold: float, below: bool) -> torch.Tensor:
    return scores < threshold if below else scores > threshold


def calibrate(holdout_scores: dict[str, torch.Tensor], fpr: float, published: dict[str, float]) -> dict[str, float]:
    """`metrics/calibration.json`: per criterion the calibrated threshold and its false-positive rate on the
    holdout images, and the published threshold's rate beside it."""
    out = {"calibration/fpr_target": fpr, "calibration/holdout_images": float(len(holdout_scores["rel_l2"]))}
    for name, (key, below) in CRITERIA.items():
        scores = holdout_scores[key]
        threshold = threshold_at(scores, fpr, below)
        out[f"calibration/{name}/threshold"] = threshold
        out[f"calibration/{name}/holdout_fpr"] = flagged(scores, threshold, below).double().mean().item()
        out[f"calibration/{name}/published_threshold"] = published[name]
        out[f"calibration/{name}/published_holdout_fpr"] = flagged(scores, published[name], below).double().mean().item()
    return out
