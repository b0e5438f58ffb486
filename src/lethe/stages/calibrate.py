"""`lethe calibrate`: each replication criterion's threshold from one half of the holdout images (real,
never trained on) scored against the training set, its false-positive rate on the other half, and its
rate on a generation null: the pretrained model's generations (it never saw the target pictures) for the
target captions, scored against the same training set, which holds those pictures. Each rate comes with
its exact 95% interval (`lethe.memorization.calibration`). Written to `metrics/calibration.json`, whose
thresholds every evaluate and detect stage reads (one calibration per dataset and feature space)."""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.evaluation.metrics import TrainingSet, generation_plan
from lethe.files import content_hash, write_json
from lethe.memorization.calibration import calibrate as calibrate_thresholds
from lethe.memorization.calibration import generation_null
from lethe.models.diffusion_model import build_scheduler, load_model
from lethe.paths import CALIBRATION, DATA, PRETRAINED
from lethe.sampling import generate
from lethe.tracking import stage_run


def null_generations(params: Params, data: PreparedData) -> torch.Tensor:
    """The pretrained model's generations for the first evaluate.prompts_per_group target captions (one per
    target picture), evaluate.generations_per_prompt each, with the seeds evaluate gives them."""
    cfg = params.evaluate
    captions = [r.caption for r in data.pictures("target")[: cfg.prompts_per_group]]
    prompts, seeds = generation_plan(captions, cfg.generations_per_prompt)
    model = load_model(PRETRAINED)
    scheduler = build_scheduler(model, params.diffusion)
    model.to(inference_device())
    return generate(model, scheduler, prompts, seeds, params.sample, label="calibrate: generation null")


def calibrate(params: Params) -> dict[str, float]:
    cfg = params.evaluate
    data = PreparedData.load(DATA)
    training = TrainingSet.load(data, cfg, calibrated=False)
    holdout = data.tensor([r.id for r in data.pictures("holdout")])
    published = {"sim": cfg.sim_threshold, "nn_ratio": cfg.nn_ratio, "rel_l2": cfg.rel_l2_threshold}
    result = calibrate_thresholds(training.replication(holdout), cfg.calibration_fpr, published)
    result |= generation_null(training.replication(null_generations(params, data)), result)
    with stage_run(params, stage="calibrate", method="calibrate", sections=("evaluate", "sample", "diffusion"),
                   data_hash=content_hash(DATA)):
        mlflow.log_metrics({k: v for k, v in result.items() if np.isfinite(v)})
    write_json(CALIBRATION, result)
    return result
