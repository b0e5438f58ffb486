"""Wen et al.'s noise magnitude on training pairs noised at random timesteps (MemControl's memorization objective)."""

from __future__ import annotations

import torch

from lethe.diffusion import guided_pass, noise_magnitude


@torch.no_grad()
def magnitude_at_random_timesteps(model, scheduler, images: torch.Tensor, captions: list[str], draws: int,
                                  generator: torch.Generator) -> torch.Tensor:
    """Wen's magnitude for training pairs (image, caption) noised at `draws` random training timesteps each.

    The pairs are the memorization subset, the timesteps and noise come from `generator`, so two models
    are scored on the very same noisy inputs. Returns n x draws.
    """
    was_training = model.training
    model.eval()
    device = model.unet.device
    x0 = model.encode_images(images.to(device))
    cond = model.encode_text(model.text_encoder.tokenize(captions))
    empty = model.encode_text(model.text_encoder.tokenize([""])).expand_as(cond)
    out = []
    for _ in range(draws):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        eps_uncond, eps_cond = guided_pass(model.unet, scheduler.add_noise(x0, noise, t), t, cond, empty)
        out.append(noise_magnitude(eps_cond, eps_uncond))
    model.train(was_training)
    return torch.stack(out, dim=1)


@torch.no_grad()
def first_step_magnitudes(model, scheduler, prompts: list[str], seeds: int, steps: int) -> torch.Tensor:
    """Wen et al.'s one-step detector for each prompt: the magnitude at the sampler's first step (`steps` DDIM
    steps), averaged over starting noises from seeds 0..seeds-1, the same noises for every prompt. N prompts in."""
    from lethe.sampling import first_step

    was_training = model.training
    model.eval()
    device = model.unet.device
    t, noise = first_step(model, scheduler, steps, seeds)
    x = noise.to(device).repeat(len(prompts), 1, 1, 1)
    cond = model.encode_text(model.text_encoder.tokenize(prompts)).repeat_interleave(seeds, 0)
    empty = model.encode_text(model.text_encoder.tokenize([""])).expand_as(cond)
    eps_uncond, eps_cond = guided_pass(model.unet, x, t, cond, empty)
    model.train(was_training)
    return noise_magnitude(eps_cond, eps_uncond).view(len(prompts), seeds).mean(1).cpu()
