"""Wen et al.'s training-time filter: drop samples whose text-conditional noise magnitude is unusually high."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class WenFilterConfig(Section):
    factor: float = Field(1.5, gt=0.0)  # drop a sample whose noise magnitude > factor x the running one at its t
    momentum: float = Field(0.8, ge=0.0, lt=1.0)


def training(params, model, scheduler, samples: int):
    from lethe.training.wen_filter import WenFilteredTraining

    cfg = params.wen_filter
    return WenFilteredTraining(model, scheduler, params.finetune, cfg.factor, cfg.momentum)


METHOD = TrainingMethod("wen_filter", "skip samples with a high noise magnitude", section="wen_filter",
                        schema=WenFilterConfig, reads=("wen_filter",), training=training)
