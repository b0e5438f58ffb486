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


@torch.no_grad()
def magnitude_at_random_timesteps(model, scheduler, images: torch.Tensor, captions: list[str], draws: int,
                                  generator: torch.Generator) -> torch.Tensor:
    """Wen's magnitude for training pairs (image, caption) noised at `draws` random training timesteps each.

    MemControl's memorization objective: the pairs are the memorization subset, the timesteps and noise
    come from `generator`, so two models are scored on the very same noisy inputs. Returns n x draws.
    """
    was_training = model.training
    model.eval()
    device = model.unet.device
    x0 = model.encode_images(images.to(device))
    cond = model.encode_text(model.text_encoder.tokenize(captions))
    states = torch.cat([cond, model.encode_text(model.text_encoder.tokenize([""])).expand_as(cond)])
    out = []
    for _ in range(draws):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        eps_cond, eps_uncond = model.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                                          encoder_hidden_states=states).sample.chunk(2)
        out.append(noise_magnitude(eps_cond, eps_uncond))
    model.train(was_training)
    return torch.stack(out, dim=1)
