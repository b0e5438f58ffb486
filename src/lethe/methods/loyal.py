"""LoyalDiffusion (Li et al.): RAU-Net, transfer blocks on the skip connections, for t >= tau only.

With `choose: measured` (the default) the skips and tau are the ones the `select_loyal` stage measured
(`lethe.search.loyal`: the least essential skips for quality, the t from which memorization arises); with
`choose: fixed`, every skip of `levels` and `tau` as given (the public configuration).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from lethe.declarations import Section, TrainingMethod
from lethe.errors import LetheError
from lethe.paths import LOYAL_CHOICE


class LoyalConfig(Section):
    """Transfer blocks on chosen skips, and the t from which the RAU-Net denoises."""

    block: Literal["conv", "conv_silu", "conv_stack", "pool", "drop", "none"] = "conv"  # none: the split alone (a control)
    init: Literal["random", "identity"] = "random"  # identity: the RAU-Net starts as the U-Net
    choose: Literal["measured", "fixed"] = "measured"  # measured: select_loyal's skips and tau; fixed: the two below
    levels: tuple[int, ...] = (0, 1)  # fixed: every skip of these up-block levels (0 = deepest; public: the two deepest)
    tau: int = Field(500, ge=1)  # fixed: RAU-Net for t >= tau (public: 500); measured: kept when nothing is measured
    skip_share: float = Field(0.5, gt=0, le=1)  # measured: the share of skips given blocks, least essential first
    skip_by: Literal["quality", "replication"] = "quality"  # measured: least FD cost, or most replication cut
    gap_share: float = Field(0.5, gt=0, le=1)  # measured: tau, the smallest t whose memorization gap reaches this share
    timesteps: int = Field(10, ge=2)  # measured: noise levels of the timestep analysis (from the sampler's schedule)


def chosen(params) -> tuple[list[tuple[int, int]] | None, int]:
    """The skips (None: every skip of `levels`) and tau that train@loyal and train@raunet use."""
    cfg = params.loyal
    if cfg.choose == "fixed":
        return None, cfg.tau
    if not LOYAL_CHOICE.exists():
        raise LetheError(f"{LOYAL_CHOICE}: missing; run `dvc repro select_loyal` first (or set loyal.choose: fixed)")
    choice = json.loads(LOYAL_CHOICE.read_text())
    return [tuple(s) for s in choice["skips"]], choice["tau"]


def measured_choice(params) -> tuple[str, ...]:
    """The file train@loyal and train@raunet read: keys their resumable runs."""
    return (str(LOYAL_CHOICE),) if params.loyal.choose == "measured" else ()


def with_raunet(params, model, every_t: bool = False) -> None:
    """The model's U-Net becomes RAU-Net, routed by the chosen tau (every t for train@raunet)."""
    from lethe.models.diffusion_model import add_raunet

    cfg = params.loyal
    skips, tau = chosen(params)
    add_raunet(model, cfg.block, skips, 0 if every_t else tau, cfg.init, levels=cfg.levels)


METHOD = TrainingMethod("loyal", "RAU-Net for t >= tau", section="loyal", schema=LoyalConfig, reads=("loyal",),
                        needs=(str(LOYAL_CHOICE),), inputs=measured_choice, prepare_model=with_raunet)
