"""`lethe pretrain`: the base model, trained from scratch on the pretraining split (none of the target images)."""

from __future__ import annotations

import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.models.diffusion_model import build_model
from lethe.models.text import corpus_vocabulary
from lethe.paths import DATA
from lethe.stages.fitting import train_and_save


def pretrain(params: Params) -> dict:
    data = PreparedData.load(DATA)
    torch.manual_seed(params.pretrain.seed)  # the same initial weights in every run and every DDP process
    if params.model.kind == "pixel":
        model = build_model(params.model, params.data.resolution, params.data.channels,
                            corpus_vocabulary([r.caption for r in data.records]))
    else:
        model = build_model(params.model, params.data.resolution, params.data.channels)
    return train_and_save(params, model, data, name="pretrained", stage="pretrain", method="pretrain",
                          cfg=params.pretrain, split="pretrain", sections=("data", "model", "diffusion", "pretrain"))
