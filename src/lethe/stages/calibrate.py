"""`lethe calibrate`: each replication criterion's threshold from the holdout images (real, never trained
on) scored against the training set, written to `metrics/calibration.json` for every evaluate and detect
stage (one calibration per dataset and feature space)."""

from __future__ import annotations

import mlflow

from lethe.data.prepared import PreparedData
from lethe.evaluation.metrics import TrainingSet
from lethe.files import content_hash, write_json
from lethe.memorization.calibration import calibrate as calibrate_thresholds
from lethe.paths import CALIBRATION, DATA
from lethe.tracking import stage_run


def calibrate(params) -> dict[str, float]:
    cfg = params.evaluate
    data = PreparedData.load(DATA)
    training = TrainingSet.load(data, cfg, calibrated=False)
    holdout = data.tensor([r.id for r in data.pictures("holdout")])
    published = {"sim": cfg.sim_threshold, "nn_ratio": cfg.nn_ratio, "rel_l2": cfg.rel_l2_threshold}
    result = calibrate_thresholds(training.replication(holdout), cfg.calibration_fpr, published)
    with stage_run(params, stage="calibrate", method="calibrate", sections=("evaluate",), data_hash=content_hash(DATA)):
        mlflow.log_metrics(result)
    write_json(CALIBRATION, result)
    return result
