"""Wen et al.'s text-conditional noise magnitude: how hard the prompt pulls the denoiser.

For a memorized prompt the conditional and unconditional noise predictions differ far more than for
other prompts, so ‖ε̂(x_t, t, c) − ε̂(x_t, t, ∅)‖₂ flags memorization (and costs nothing extra during
classifier-free-guided sampling, which computes both anyway).
"""

from __future__ import annotations

import torch


def noise_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the text-conditional part of the noise prediction."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)
