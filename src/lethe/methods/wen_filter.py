"""Wen et al.'s training-time filter: drop samples whose text-conditional noise magnitude is unusually high."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class WenFilterConfig(Section):
    factor: float = Field(1.5, gt=0.0)  # drop a sample whose noise magnitude > factor x the running one at its t
    momentum: float = Field(0.8, ge=0.0, lt=1.0)
    timestep_bins: int = Field(10, ge=1)  # the running magnitude is kept per range of timesteps
    min_samples: int = Field(32, ge=1)  # a range drops nothing until it has seen this many magnitudes


def training(params, model, scheduler, samples: int):
    from lethe.training.wen_filter import WenFilteredTraining

    cfg = params.wen_filter
    return WenFilteredTraining(model, scheduler, params.finetune, cfg.factor, cfg.momentum, cfg.timestep_bins,
                               cfg.min_samples)


METHOD = TrainingMethod("wen_filter", "skip samples with a high noise magnitude", section="wen_filter",
                        schema=WenFilterConfig, reads=("wen_filter",), training=training)
