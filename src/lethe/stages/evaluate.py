"""`lethe evaluate <variant>`: generate for dup, unique and holdout prompts; measure replication, quality
and cost per group; write `metrics/<variant>.json`, log the same to MLflow with a gallery."""

from __future__ import annotations

import json
import time

import mlflow
import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.evaluation.clip_score import load_clip_score
from lethe.evaluation.featurizer import prompt_accuracy
from lethe.evaluation.gallery import save_gallery
from lethe.evaluation.metrics import TrainingSet, diversity, frechet_distance, generation_plan, quality_features
from lethe.files import atomic_dir, content_hash, write_json
from lethe.memorization.replication import summarize
from lethe.models.diffusion_model import build_scheduler, load_model
from lethe.paths import DATA, REPORTS, model_dir, train_metrics_file, variant_metrics_file
from lethe.sampling import generate, save_grid
from lethe.tracking import stage_run


def evaluate(params: Params, variant: str) -> dict[str, float]:
    cfg = params.evaluate
    data = PreparedData.load(DATA)
    model = load_model(model_dir(variant))
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
    train_metrics = train_metrics_file(variant)
    if train_metrics.exists():
        metrics |= {k: v for k, v in json.loads(train_metrics.read_text()).items() if k.startswith("cost/")}

    with stage_run(params, stage="evaluate", method=variant, sections=("evaluate", "sample"),
                   data_hash=content_hash(DATA)):
        mlflow.log_metrics(metrics)
        with atomic_dir(REPORTS / "evaluate" / variant) as tmp:
            save_gallery(shown, training.pixels, tmp / "gallery.png")
            save_grid(torch.cat([s[1] for s in shown]), tmp / "samples.png", nrow=cfg.gallery_rows)
        mlflow.log_artifacts(str(REPORTS / "evaluate" / variant))
    write_json(variant_metrics_file(variant), metrics)
    return metrics
