"""LoyalDiffusion (Li et al.): RAU-Net, transfer blocks on the skip connections, for t >= tau only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class LoyalConfig(Section):
    """Transfer blocks on the skips of the chosen up-block levels (0 = deepest)."""

    block: Literal["conv", "conv_silu", "conv_stack", "pool", "drop"] = "conv"
    levels: tuple[int, ...] = (0, 1)  # the public configuration: the two deepest levels
    tau: int = Field(500, ge=1)  # RAU-Net for t >= tau, the standard U-Net below (train@raunet: every t)
    init: Literal["random", "identity"] = "random"  # identity: the RAU-Net starts as the U-Net


def with_raunet(params, model, tau: int | None = None) -> None:
    """The model's U-Net becomes RAU-Net, routed by t (`loyal.tau`, or the given tau; 0: every t)."""
    from lethe.models.diffusion_model import add_raunet

    cfg = params.loyal
    add_raunet(model, cfg.block, cfg.levels, cfg.tau if tau is None else tau, cfg.init)


METHOD = TrainingMethod("loyal", "RAU-Net for t >= tau", section="loyal", schema=LoyalConfig, reads=("loyal",),
                        prepare_model=with_raunet)
