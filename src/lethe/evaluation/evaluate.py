"""The `evaluate@<variant>` stage: generate for dup, unique and holdout prompts; measure replication,
quality and cost per group; write `metrics/<variant>.json`, log the same to MLflow with a gallery.

Replication is measured against every image the variant was trained on (pretraining and target
splits); quality against the holdout images, which no model saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from lethe.config import EvaluateConfig, Params
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.evaluation.clip_score import load_clip_score
from lethe.evaluation.featurizer import Featurizer, has_featurizer, load_featurizer, prompt_accuracy
from lethe.evaluation.gallery import save_gallery
from lethe.files import atomic_dir, content_hash, write_json
from lethe.memorization.features import load_features
from lethe.memorization.replication import Criteria, replication_scores, summarize
from lethe.models.factory import build_scheduler, load_model
from lethe.sampling import generate, save_grid
from lethe.tracking import stage_run

DATA, FEATURIZER = Path("data/prepared"), Path("models/featurizer")


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


def evaluate(params: Params, variant: str) -> dict[str, float]:
    cfg = params.evaluate
    data = PreparedData.load(DATA)
    model = load_model(Path("models") / variant)
    scheduler = build_scheduler(model, params.diffusion)
    model.to(inference_device())
    training = TrainingSet.load(data, cfg)
    holdout_pixels = data.tensor([r.id for r in data.split("holdout")])
    featurizer = quality_features(cfg, holdout_pixels, training.featurize)
    clip_score = load_clip_score(cfg.clip_model_path, cfg.open_clip_model, inference_device()) if cfg.clip_model_path else None

    metrics, shown, generated_seconds, generated_count = {}, [], 0.0, 0
    for group, records in data.prompt_groups(cfg.prompts_per_group).items():
        if not records:
            continue
        k = cfg.generations_per_prompt
        prompts, seeds = generation_plan([r.caption for r in records], k)
        started = time.perf_counter()
        images = generate(model, scheduler, prompts, seeds, params.sample)
        generated_seconds += time.perf_counter() - started
        generated_count += len(images)
        scores = training.replication(images)
        group_metrics = {f"replication/{name}": value for name, value in summarize(scores).items()}
        with torch.no_grad():
            group_metrics["quality/fd"] = frechet_distance(featurizer, holdout_pixels, images)
            group_metrics["quality/diversity"] = diversity(featurizer(images), k)
            if clip_score is not None:
                group_metrics["quality/clip_score"] = clip_score(images, prompts).mean().item()
        accuracy = prompt_accuracy(featurizer, images, [r.label for r in records for _ in range(k)])
        if accuracy is not None:
            group_metrics["quality/prompt_accuracy"] = accuracy
        metrics |= {f"{name}/{group}": value for name, value in group_metrics.items()}
        rows = min(cfg.gallery_rows, len(records))
        shown.append((group, images[::k][:rows], [r.caption for r in records[:rows]],
                      {key: value[::k][:rows] for key, value in scores.items()}))

    metrics["cost/seconds_per_image"] = generated_seconds / max(generated_count, 1)
    train_metrics = Path("metrics/train") / f"{variant}.json"
    if train_metrics.exists():
        metrics |= {k: v for k, v in json.loads(train_metrics.read_text()).items() if k.startswith("cost/")}

    with stage_run(params, stage="evaluate", method=variant, sections=("evaluate", "sample"),
                   data_hash=content_hash(DATA)):
        mlflow.log_metrics(metrics)
        with atomic_dir(Path("reports/evaluate") / variant) as tmp:
            save_gallery(shown, training.pixels, tmp / "gallery.png")
            save_grid(torch.cat([s[1] for s in shown]), tmp / "samples.png", nrow=cfg.gallery_rows)
        mlflow.log_artifacts(str(Path("reports/evaluate") / variant))
    write_json(Path("metrics") / f"{variant}.json", metrics)
    return metrics
