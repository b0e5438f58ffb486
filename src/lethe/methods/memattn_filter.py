"""MemAttn's training-time filter (Ren et al., ECCV 2024): skip samples with abnormal cross-attention entropy."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class MemAttnFilterConfig(Section):
    layer: int = Field(0, ge=0)  # cross-attention layer whose entropy is read, in forward order
    z: float = Field(2.0, gt=0.0)  # skip when entropy > running mean + z x running std (not published)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    timestep_bins: int = Field(10, ge=1)  # running statistics per range of timesteps (entropy falls with t)


def training(params, model, scheduler, samples: int):
    from lethe.training.memattn_filter import MemAttnFilteredTraining

    f = params.memattn_filter
    return MemAttnFilteredTraining(model, scheduler, params.finetune, f.layer, f.z, f.momentum, f.timestep_bins)


METHOD = TrainingMethod("memattn_filter", "skip samples with abnormal attention entropy", section="memattn_filter",
                        schema=MemAttnFilterConfig, reads=("memattn_filter",), training=training)
