"""`lethe evaluate <variant>`: generate for dup, unique and holdout prompts; measure replication, quality
and cost per group, each with a 95% interval over prompts, and (for a variant other than the baseline)
the paired change against the baseline's generations for the same prompts and seeds. Writes
`metrics/<variant>.json` and the per-generation outcomes `metrics/outcomes/<variant>.npz`; logs the same
to MLflow with a gallery."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.errors import LetheError
from lethe.evaluation.clip_score import load_clip_score
from lethe.evaluation.featurizer import prompt_correct
from lethe.evaluation.figures import group_figures, headline, paired_figures, statistics
from lethe.evaluation.gallery import save_gallery
from lethe.evaluation.metrics import (FeatureDistances, Pictures, TrainingSet, generation_plan, prompt_diversity,
                                     quality_features)
from lethe.files import atomic_dir, content_hash, load_outcomes, save_outcomes, write_json
from lethe.models.diffusion_model import build_scheduler, load_model
from lethe.paths import DATA, REPORTS, headline_metrics_file, model_dir, outcomes_file, train_metrics_file, variant_metrics_file
from lethe.sampling import generate, save_grid
from lethe.tracking import stage_run

BASELINE = "baseline"
# per-generation arrays every outcomes file holds: a baseline's file without one was written by an older lethe
OUTCOMES = ("prompts", "features", "sim", "diversity", "copied", "sim_copied", "nn_ratio_copied", "rel_l2_copied",
            "gu_copied", "reidentified", "own_rel_l2")


def evaluate(params: Params, variant: str) -> dict[str, float]:
    cfg = params.evaluate
    data = PreparedData.load(DATA)
    baseline = None
    if variant != BASELINE:
        if not outcomes_file(BASELINE).exists():
            raise LetheError(f"{outcomes_file(BASELINE)}: missing; run `dvc repro evaluate@baseline` first "
                             "(every variant is compared with the baseline on the same prompts)")
        baseline = load_outcomes(outcomes_file(BASELINE))
        for theirs in baseline.values():  # before an hour of generation, not after
            require_complete(theirs)
    model = load_model(model_dir(variant))
    scheduler = build_scheduler(model, params.diffusion)
    model.to(inference_device())
    training = TrainingSet.load(data, cfg)
    pictures = Pictures.load(data, training, cfg)  # re-identification's candidates: every target and holdout picture
    holdout_pixels = data.tensor([r.id for r in data.pictures("holdout")])
    featurizer = quality_features(cfg, holdout_pixels, training.featurize)
    with torch.no_grad():
        distances = FeatureDistances(featurizer(holdout_pixels).double())
    clip_score = load_clip_score(cfg.clip_model_path, cfg.open_clip_model, inference_device()) if cfg.clip_model_path else None

    metrics: dict[str, float] = {}
    outcomes, shown, generated_seconds, generated_count = {}, [], 0.0, 0
    k = cfg.generations_per_prompt
    for group, records in data.prompt_groups(cfg.prompts_per_group).items():
        metrics[f"prompts/{group}"] = float(len(records))
        if not records:  # e.g. no dup group on a folder without copies: said in the metrics, not invented
            continue
        prompts, seeds = generation_plan([r.caption for r in records], k)
        started = time.perf_counter()
        images = generate(model, scheduler, prompts, seeds, params.sample, label=f"evaluate {variant}: {group}")
        generated_seconds += time.perf_counter() - started
        generated_count += len(images)
        scores = training.replication(images, [r.id for r in records for _ in range(k)], pictures)
        with torch.no_grad():
            features = featurizer(images)
            o = {"prompts": np.array(prompts), "features": features.double().numpy(),
                 "sim": scores["sim"].numpy(), "diversity": prompt_diversity(features, k).numpy(),
                 "own_rel_l2": scores["own_rel_l2"].numpy(),
                 **{flag: scores[flag].numpy() for flag in ("copied", "sim_copied", "nn_ratio_copied",
                                                           "rel_l2_copied", "gu_copied", "reidentified")}}
            correct = prompt_correct(featurizer, images, [r.label for r in records for _ in range(k)])
            if correct is not None:
                o["correct"] = correct.numpy()
            if clip_score is not None:
                o["clip_score"] = clip_score(images, prompts).numpy()
        outcomes[group] = o
        stats = statistics(o, k, distances)
        metrics |= group_figures(group, stats, len(records), cfg.bootstrap)
        if baseline is not None:
            metrics |= paired_figures(group, stats, statistics(paired_with(baseline, group, o), k, distances),
                                      len(records), cfg.bootstrap)
        rows = min(cfg.gallery_rows, len(records))
        shown.append((group, images[::k][:rows], [r.caption for r in records[:rows]],
                      {key: value[::k][:rows] for key, value in scores.items()}))

    metrics["cost/seconds_per_image"] = generated_seconds / max(generated_count, 1)
    train_metrics = train_metrics_file(variant)
    if train_metrics.exists():
        metrics |= {k: v for k, v in json.loads(train_metrics.read_text()).items() if k.startswith("cost/")}

    with stage_run(params, stage="evaluate", method=variant, sections=("evaluate", "sample"),
                   data_hash=content_hash(DATA)):
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        with atomic_dir(REPORTS / "evaluate" / variant) as tmp:
            if shown:
                save_gallery(shown, training.pixels, tmp / "gallery.png")
                save_grid(torch.cat([s[1] for s in shown]), tmp / "samples.png", nrow=cfg.gallery_rows)
        mlflow.log_artifacts(str(REPORTS / "evaluate" / variant))
    outcomes_file(variant).parent.mkdir(parents=True, exist_ok=True)
    save_outcomes(outcomes_file(variant), outcomes)
    write_json(variant_metrics_file(variant), metrics)
    write_json(headline_metrics_file(variant), headline(metrics))
    return metrics


def paired_with(baseline: dict[str, dict[str, np.ndarray]], group: str, outcomes: dict[str, np.ndarray]):
    """The baseline's outcomes of this group, checked to be for the same prompts in the same order and to hold
    every per-generation array (OUTCOMES) this lethe pairs."""
    theirs = baseline.get(group)
    if theirs is not None:
        require_complete(theirs)
    if theirs is None or theirs["prompts"].tolist() != outcomes["prompts"].tolist():
        raise LetheError(f"{outcomes_file(BASELINE)}: the baseline was evaluated on other '{group}' prompts; "
                         "run `dvc repro evaluate@baseline` again")
    return theirs


def require_complete(theirs: dict[str, np.ndarray]) -> None:
    """A baseline's group outcomes hold every OUTCOMES array, or the one line that says to re-run it."""
    missing = [name for name in OUTCOMES if name not in theirs]
    if missing:
        raise LetheError(f"{outcomes_file(BASELINE)}: written by an older lethe (no {', '.join(missing)}); "
                         "run `dvc repro evaluate@baseline` again")
