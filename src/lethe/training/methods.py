"""Which LightningModule, dataset and model changes each `train@<method>` uses.

Every method fine-tunes the same pretrained model on the same target split for the same number of
optimizer steps of the same batch size, so they see the same number of samples (skipping methods
then take fewer per-sample gradients, which is how they work).
"""

from __future__ import annotations

import numpy as np

from lethe.config import Params
from lethe.data.shards import SHARDS, load_shards
from lethe.models.factory import DiffusionModel, add_raunet
from lethe.training.ensemble import ProxyEnsemble
from lethe.training.memattn_filter import MemAttnFilteredTraining
from lethe.training.module import DiffusionTraining
from lethe.training.wen_filter import WenFilteredTraining


# the params sections each method reads (logged to its MLflow run; the stage's DVC params)
SECTIONS = {
    "baseline": (),
    "loyal": ("loyal",),
    "raunet": ("loyal",),
    "ietagc": ("ietagc",),
    "ietagc_plus": ("ietagc", "ietagc_plus"),
    "wen_filter": ("wen_filter",),
    "random_caption": ("random_caption",),
    "memattn_filter": ("memattn_filter",),
    "memcontrol": ("memcontrol",),
}


class RandomCaptionWords:
    """Somepalli et al.: append random words from the captions' vocabulary each time a caption is drawn."""

    def __init__(self, captions: list[str], words: int, probability: float, seed: int):
        self.vocabulary = sorted({w for c in captions for w in c.split()})
        self.words, self.probability = words, probability
        self.rng = np.random.default_rng(seed)

    def __call__(self, caption: str) -> str:
        if self.rng.random() >= self.probability:
            return caption
        return " ".join([caption, *self.rng.choice(self.vocabulary, self.words)])


def training_module(params: Params, method: str, model: DiffusionModel, scheduler, samples: int) -> DiffusionTraining:
    cfg = params.finetune
    if method in ("loyal", "raunet"):
        add_raunet(model, params.loyal, tau=0 if method == "raunet" else params.loyal.tau)
    if method == "wen_filter":
        return WenFilteredTraining(model, scheduler, cfg, params.wen_filter.factor, params.wen_filter.momentum)
    if method == "memattn_filter":
        f = params.memattn_filter
        return MemAttnFilteredTraining(model, scheduler, cfg, f.layer, f.z, f.momentum, f.timestep_bins)
    if method == "memcontrol":  # the mask and learning rate the `memcontrol` search chose
        from lethe.search.memcontrol import chosen_training

        return chosen_training(params, model, scheduler)
    if method in ("ietagc", "ietagc_plus"):
        iet, plus = params.ietagc, params.ietagc_plus if method == "ietagc_plus" else None
        return ProxyEnsemble(
            model, scheduler, cfg, assignment=load_shards(SHARDS, samples), local_steps=iet.local_steps,
            agc_lambda=iet.agc_lambda, bank_momentum=iet.bank_momentum,
            msr_share=plus.msr_share if plus else None, taa_max_shift=plus.taa_max_shift if plus else 0,
        )
    return DiffusionTraining(model, scheduler, cfg)


def caption_noise(params: Params, method: str, captions: list[str]):
    if method != "random_caption":
        return None
    rc = params.random_caption
    return RandomCaptionWords(captions, rc.words, rc.probability, rc.seed)
