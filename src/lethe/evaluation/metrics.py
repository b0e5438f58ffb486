"""What the evaluation measures with: the training set a generation may copy, the feature spaces of
replication and quality, FD and diversity. The `evaluate`, `detect` stages and MemControl's objective
share them.

Replication is measured against every image the variant was trained on (pretraining and target
splits); quality against the holdout images, which no model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from lethe.config import EvaluateConfig
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.evaluation.featurizer import Featurizer, has_featurizer, load_featurizer
from lethe.memorization.features import load_features
from lethe.memorization.replication import Criteria, replication_scores
from lethe.paths import FEATURIZER


def criteria(cfg: EvaluateConfig) -> Criteria:
    return Criteria(cfg.sim_threshold, cfg.nn_ratio, cfg.rel_l2_n, cfg.rel_l2_threshold, cfg.criterion, cfg.chunk_size)


class FeatureSpace(torch.nn.Module):
    """Features (SSCD, open_clip, pixels) as the module torchmetrics' FD takes, feature size given up front."""

    def __init__(self, featurize: Callable[[torch.Tensor], torch.Tensor], dim: int):
        super().__init__()
        self.featurize, self.num_features = featurize, dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.featurize(images)


def frechet_distance(featurizer: Featurizer | FeatureSpace, real: torch.Tensor, fake: torch.Tensor) -> float:
    fd = FrechetInceptionDistance(feature=featurizer, reset_real_features=False)
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return fd.compute().item()


@torch.no_grad()
def diversity(features: torch.Tensor, per_prompt: int) -> float:
    """1 - mean cosine similarity between generations of the same prompt (0: every seed gives one image)."""
    if per_prompt < 2:
        return float("nan")
    f = F.normalize(features, dim=1).view(-1, per_prompt, features.shape[1])
    sim = f @ f.transpose(1, 2)
    off_diagonal = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return 1 - (off_diagonal / (per_prompt * (per_prompt - 1))).mean().item()


def generation_plan(captions: list[str], per_prompt: int) -> tuple[list[str], list[int]]:
    """Each caption `per_prompt` times, every generation its own seed. Seeds shared across prompts would
    make a prompt-blind model's group a few repeated images, and FD would score that collapse (150
    against 26 with distinct seeds, measured) instead of the images' quality."""
    prompts = [c for c in captions for _ in range(per_prompt)]
    return prompts, list(range(len(prompts)))


@dataclass
class TrainingSet:
    """Every image a variant was trained on (pretraining and target splits): what a generation may copy."""

    pixels: torch.Tensor
    features: torch.Tensor
    featurize: Callable[[torch.Tensor], torch.Tensor]
    criteria: Criteria

    @classmethod
    def load(cls, data: PreparedData, cfg: EvaluateConfig) -> "TrainingSet":
        featurize = replication_features(cfg)
        pixels = data.tensor([r.id for r in data.records if r.split in ("pretrain", "target")])
        return cls(pixels, featurize(pixels), featurize, criteria(cfg))

    def replication(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return replication_scores(self.featurize(images), self.features, images, self.pixels, self.criteria)


def replication_features(cfg: EvaluateConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    return load_features(cfg.features, str(FEATURIZER) if cfg.features == "featurizer" else cfg.features_path,
                         cfg.open_clip_model, inference_device())


def quality_features(cfg: EvaluateConfig, reference: torch.Tensor,
                     featurize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Featurizer | FeatureSpace:
    """FD's and diversity's feature space: the featurizer on labelled data (the digits), else on an image
    folder (no labels to train one) evaluate.features' space; `reference` images give its width."""
    if has_featurizer(FEATURIZER):
        return load_featurizer(FEATURIZER)
    featurize = featurize or replication_features(cfg)
    return FeatureSpace(featurize, featurize(reference[:1]).shape[1])
