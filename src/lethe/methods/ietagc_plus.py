"""IET-AGC+ (Guan et al., 2025): IET-AGC with memory-sample redistribution and threshold-aware augmentation."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod
from lethe.methods.ietagc import proxy_ensemble
from lethe.paths import SHARDS


class IetPlusConfig(Section):
    """On top of ietagc's section."""

    msr_share: float = Field(0.25, gt=0.0, le=1.0)  # most-skipped share handed to the next shard
    taa_max_shift: int = Field(2, ge=0)  # augmentation: translation by up to this many pixels


METHOD = TrainingMethod(
    "ietagc_plus", "IET-AGC with redistribution and augmentation", section="ietagc_plus", schema=IetPlusConfig,
    reads=("ietagc", "ietagc_plus"), needs=(str(SHARDS),),
    training=lambda params, model, scheduler, samples: proxy_ensemble(params, model, scheduler, samples,
                                                                      plus=params.ietagc_plus),
)
