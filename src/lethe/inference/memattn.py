"""MemAttn's inference-time mitigation (Ren et al., ECCV 2024).

Memorized prompts pull cross-attention away from the beginning token onto a few trigger tokens. In
every cross-attention layer and step, on the conditional branch only: mask the padding ("summary")
tokens after the first end token, and multiply the beginning token's raw logit by C (> 1), which
hands attention back to the beginning token and away from the triggers.
"""

from __future__ import annotations

import contextlib

import torch

from lethe.memorization.attention import AttentionControl


def through_first_end(ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """B x L, True up to and including each row's first end token (everything, where there is none)."""
    is_end = ids == end_id
    first = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full((len(ids),), ids.shape[1] - 1))
    return torch.arange(ids.shape[1])[None, :] <= first[:, None]


def memattn_steering(control: AttentionControl | None, cond_ids: torch.Tensor, end_id: int, settings: dict | None):
    """Steer the conditional rows of a [unconditional; conditional] batch; a no-op without settings."""
    if control is None or not settings:
        return contextlib.nullcontext()
    n = len(cond_ids)
    conditional = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    keep = through_first_end(cond_ids, end_id) if settings.get("mask_padding", True) else None
    keep = torch.cat([torch.ones_like(keep), keep]) if keep is not None else None
    return control.steer(conditional, keep, float(settings.get("begin_scale", 1.0)))
