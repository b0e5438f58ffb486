"""Pure diffusion functions, each written once: the training target and per-sample loss, the guided
pass, the unconditional pass and Wen's noise magnitude.

The training module, the sampler, the detectors, Wen's filter and MemControl's objective all call
these; none of them holds state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t on the scheduler's forward process, and what the denoiser learns to predict from it (ε, or v where
    the scheduler asks for v-prediction, as some checkpoints do)."""
    noisy = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(x0, noise, t)
    return noisy, noise


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The denoising loss of each sample: mean squared error over its pixels (in float32)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def guided_pass(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional and conditional noise predictions for the same inputs, in one batched U-Net call.

    `t` is one timestep for the batch or one per row; rows are [unconditional; conditional].
    """
    t = torch.cat([t, t]) if torch.is_tensor(t) and t.dim() == 1 else t
    eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return eps_uncond, eps_cond


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@torch.no_grad()
def unconditional_prediction(unet, noisy: torch.Tensor, t, empty: torch.Tensor) -> torch.Tensor:
    """The same noisy input denoised with the empty prompt (expanded over the batch), without gradient."""
    return unet(noisy, t, encoder_hidden_states=empty.expand(len(noisy), *empty.shape[1:])).sample


def noise_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s per-sample L2 norm of the text-conditional part of the noise prediction.

    For a memorized prompt the conditional and unconditional predictions differ far more than for
    other prompts, so ‖ε̂(x_t, t, c) − ε̂(x_t, t, ∅)‖₂ flags memorization; it costs nothing extra during
    guided sampling, which computes both anyway.
    """
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)
