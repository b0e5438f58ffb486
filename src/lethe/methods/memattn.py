"""MemAttn's inference-time mitigation (Ren et al., ECCV 2024): mask the padding, scale the beginning token."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import InferenceMitigation, Section


class MemAttnConfig(Section):
    begin_scale: float = Field(1.25, ge=1.0)  # C: the beginning token's logit is multiplied by this
    mask_padding: bool = True  # mask the tokens after the first end token


def steer(control, ids, end_id: int, settings: dict):
    from lethe.inference.memattn import memattn_steering

    return memattn_steering(control, ids, end_id, settings)


METHOD = InferenceMitigation("memattn", "attention steering", acts="attention", stage="mitigate", section="memattn",
                             schema=MemAttnConfig, reads=("memattn",),
                             settings=lambda params: params.memattn.model_dump(mode="json"), in_attention=steer)
