"""`lethe train <method>`: the pretrained model fine-tuned on the target split (with its duplicates) by a method."""

from __future__ import annotations

import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.methods import training_method
from lethe.models.diffusion_model import load_model
from lethe.paths import DATA, PRETRAINED
from lethe.stages.fitting import train_and_save


def train(params: Params, method: str) -> dict:
    declared = training_method(method)
    if declared.seed_offset:  # an A/A replicate: the same fine-tuning, another training seed
        finetune = params.finetune.model_copy(update={"seed": params.finetune.seed + declared.seed_offset})
        params = params.model_copy(update={"finetune": finetune})
    data = PreparedData.load(DATA)
    model = load_model(PRETRAINED)
    # a method's new weights (RAU-Net's transfer blocks, LoRA adapters) are drawn before fit() seeds: seed
    # here, or they take the generator's state, which torch seeds from entropy in every new process
    torch.manual_seed(params.finetune.seed)
    if declared.prepare_model:
        declared.prepare_model(params, model)
    training = (lambda m, s, n: declared.training(params, m, s, n)) if declared.training else None
    noise = (lambda captions: declared.caption_noise(params, captions)) if declared.caption_noise else None
    inputs = declared.inputs(params) if declared.inputs else declared.needs
    return train_and_save(params, model, data, name=method, stage="train", method=method, cfg=params.finetune,
                          split="target", sections=("finetune", "sample", "probe", *declared.reads),
                          training=training, caption_noise=noise, probe_cfg=params.probe, inputs=inputs)
