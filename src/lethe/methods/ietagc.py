"""IET-AGC (Liu et al., ECCV 2024): proxies on shards with anti-gradient control, averaged every round."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod
from lethe.paths import SHARDS


class IetConfig(Section):
    """K proxies on K shards, anti-gradient control, weighted averaging after each round."""

    shards: int = Field(4, ge=2)
    local_steps: int = Field(25, ge=1)  # steps each proxy takes per round
    agc_lambda: float = Field(2.0, gt=0.0)  # keep a sample iff lambda * loss >= bank[t]
    bank_momentum: float = Field(0.8, ge=0.0, lt=1.0)
    timestep_bins: int = Field(10, ge=1)  # each proxy's bank keeps its running loss per range of timesteps
    min_samples: int = Field(32, ge=1)  # a range skips nothing until it has seen this many losses
    seed: int = 0


def proxy_ensemble(params, model, scheduler, samples: int, plus=None, agc: bool = True, keep=None):
    """The ensemble's LightningModule; `plus` (IET-AGC+'s section) adds redistribution and augmentation;
    `agc=False` keeps every sample (the `iet` ablation); `keep` replaces anti-gradient control's choice
    with a blind one (the random-skip controls)."""
    from lethe.data.shards import load_shards
    from lethe.training.ensemble import ProxyEnsemble

    iet = params.ietagc
    return ProxyEnsemble(
        model, scheduler, params.finetune, assignment=load_shards(SHARDS, samples), local_steps=iet.local_steps,
        agc_lambda=iet.agc_lambda, bank_momentum=iet.bank_momentum, bank_bins=iet.timestep_bins,
        bank_min_samples=iet.min_samples, agc=agc, keep=keep,
        msr_share=plus.msr_share if plus else None, taa_max_shift=plus.taa_max_shift if plus else 0,
    )


METHOD = TrainingMethod("ietagc", "proxies on shards, anti-gradient control", section="ietagc", schema=IetConfig,
                        reads=("ietagc",), needs=(str(SHARDS),), training=proxy_ensemble)
