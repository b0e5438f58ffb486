"""`lethe featurizer`: the feature network for FD and prompt accuracy, trained on the pretraining split."""

from __future__ import annotations

import json

import mlflow
import torch

from lethe.data.prepared import PreparedData
from lethe.evaluation.featurizer import NO_LABELS, accuracy, save_featurizer, train_featurizer
from lethe.files import atomic_dir, content_hash
from lethe.paths import DATA, FEATURIZER
from lethe.tracking import stage_run


def featurizer(params) -> dict[str, float]:
    """Train on the pretraining split, report accuracy on the holdout split (an image folder: nothing to train)."""
    data = PreparedData.load(DATA)
    if any(r.label is None for r in data.records):  # an image folder: nothing to train; evaluate uses its features
        with atomic_dir(FEATURIZER) as tmp:
            (tmp / "config.json").write_text(json.dumps(NO_LABELS) + "\n")
        return {}
    pretrain, holdout = data.split("pretrain"), data.split("holdout")
    cfg = params.featurizer
    with stage_run(params, stage="featurizer", method="featurizer", sections=("featurizer",),
                   data_hash=content_hash(DATA)):
        net = train_featurizer(data.tensor([r.id for r in pretrain]), torch.tensor([r.label for r in pretrain]),
                               cfg.feature_dim, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
        metrics = {"featurizer/holdout_accuracy": accuracy(net, data.tensor([r.id for r in holdout]),
                                                           torch.tensor([r.label for r in holdout]))}
        mlflow.log_metrics(metrics)
        with atomic_dir(FEATURIZER) as tmp:
            save_featurizer(net, tmp)
    return metrics
