"""Does a generated image replicate a training image? The published criteria, computed in chunks.

- Top-1 similarity (Somepalli et al.): the highest cosine similarity of a generation's features to any
  training image's; summarised as the mean, the 95th percentile and the share above a threshold.
- Nearest over second-nearest (Gu et al.): pixel L2; a copy when d1 / d2 < 1/3.
- Relative L2 (Carlini et al.; IET-AGC's score): d1 over the mean distance to the n nearest (the
  nearest included); a copy when below a threshold.

Two per-generation figures ask about the prompt's OWN picture (the one whose caption made the prompt):

- Re-identification: among one image per target and per holdout picture, is the generation's nearest
  its own picture? (For a holdout prompt the own picture was never trained on: the chance level.)
- Own relative L2: the distance to the own picture over the same scale as `rel_l2` (the mean distance to
  the n nearest training images); equal to `rel_l2` when the own picture is the nearest. Continuous,
  lower = closer to a copy, so it still moves where every rate sits at 0.

The nearest-neighbour search visits the training set in chunks (`nearest_neighbors`), so a million
reference vectors fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lethe.memorization.neighbors import nearest_neighbors

EPS = 1e-12


@dataclass(frozen=True)
class Criteria:
    sim_threshold: float = 0.5  # Somepalli et al.'s replication threshold with SSCD features
    nn_ratio: float = 1 / 3  # Gu et al.
    rel_l2_n: int = 50  # IET-AGC's n, the nearest itself counted
    rel_l2_threshold: float = 0.5
    criterion: str = "rel_l2"  # which of sim | nn_ratio | rel_l2 decides `rate`
    chunk_size: int = 65536
    published_nn_ratio: float = 1 / 3  # Gu et al.'s fixed threshold, reported beside a calibrated one


def top1_similarity(gen_features: torch.Tensor, ref_features: torch.Tensor, chunk_size: int = 65536):
    """Highest cosine similarity to any reference, and that reference's index."""
    # on unit vectors the L2-nearest is the cosine-nearest, and cos = 1 - d^2 / 2
    d, i = nearest_neighbors(gen_features, ref_features, k=1, chunk_size=chunk_size, unit=True)
    return 1 - d[:, 0] ** 2 / 2, i[:, 0]


def pixel_scores(gen_pixels: torch.Tensor, ref_pixels: torch.Tensor, criteria: Criteria) -> dict[str, torch.Tensor]:
    """Per generation: nearest / second-nearest ratio, relative L2, and the nearest's index."""
    d, i = nearest_neighbors(gen_pixels, ref_pixels, k=max(2, criteria.rel_l2_n), chunk_size=criteria.chunk_size)
    scale = d.mean(1)  # rel_l2's denominator: the mean distance to the n nearest, the nearest included
    return {
        "nn_ratio": d[:, 0] / (d[:, 1] + EPS),
        "rel_l2": d[:, 0] / (scale + EPS),
        "rel_l2_scale": scale,
        "nearest": i[:, 0],
        "nearest_distance": d[:, 0],
    }


def own_relative_l2(gen_pixels: torch.Tensor, own_pixels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per generation: pixel L2 to its own picture over `scale` (pixel_scores' `rel_l2_scale`): rel_l2 with
    the own picture in place of the nearest."""
    return (gen_pixels.flatten(1).float() - own_pixels.flatten(1).float()).norm(dim=1) / (scale + EPS)


def reidentified(gen_features: torch.Tensor, picture_features: torch.Tensor, own: torch.Tensor,
                 chunk_size: int = 65536) -> torch.Tensor:
    """Per generation: is its nearest picture (one row of `picture_features` per target and holdout picture)
    its own, row `own`? L2 on unit-length features, as `top1_similarity` ranks them: the nearest is the most
    cosine-similar, the ranking SSCD and CLIP features are made for (the calibrated `sim` criterion's too)."""
    _, i = nearest_neighbors(gen_features, picture_features, k=1, chunk_size=chunk_size, unit=True)
    return i[:, 0] == torch.as_tensor(own, dtype=torch.long)


def replication_scores(gen_features, ref_features, gen_pixels, ref_pixels, criteria: Criteria) -> dict[str, torch.Tensor]:
    sim, sim_nearest = top1_similarity(gen_features, ref_features, criteria.chunk_size)
    scores = pixel_scores(gen_pixels, ref_pixels, criteria)
    copied = {
        "sim": sim > criteria.sim_threshold,
        "nn_ratio": scores["nn_ratio"] < criteria.nn_ratio,
        "rel_l2": scores["rel_l2"] < criteria.rel_l2_threshold,
    }
    return {**scores, "sim": sim, "sim_nearest": sim_nearest, "copied": copied[criteria.criterion],
            "sim_copied": copied["sim"], "nn_ratio_copied": copied["nn_ratio"], "rel_l2_copied": copied["rel_l2"],
            "gu_copied": scores["nn_ratio"] < criteria.published_nn_ratio}


def summarize(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """The `replication/*` metrics of one group of generations."""
    return {
        "sim_top1_mean": scores["sim"].mean().item(),
        "sim_p95": torch.quantile(scores["sim"], 0.95).item(),
        "sim_rate": scores["sim_copied"].float().mean().item(),
        "rate": scores["copied"].float().mean().item(),
        "nn_ratio_rate": scores["nn_ratio_copied"].float().mean().item(),
        "rel_l2_rate": scores["rel_l2_copied"].float().mean().item(),
        "gu_published_rate": scores["gu_copied"].float().mean().item(),
    }
