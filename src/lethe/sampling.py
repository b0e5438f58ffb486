"""Generate images: DDIM (η = 0) through diffusers' scheduler, classifier-free guidance, batched.

Each prompt's starting noise comes from its own seed on the CPU, so a (prompt, seed) pair gives the
same image whatever the batch it lands in and whatever the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from PIL import Image
from torchvision.utils import make_grid

from lethe.config import SampleConfig
from lethe.data.prepared import to_uint8
from lethe.models.factory import DiffusionModel


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    model: DiffusionModel, train_scheduler: SchedulerMixin, prompts: list[str], seeds: list[int], cfg: SampleConfig
) -> torch.Tensor:
    """Images in [-1, 1], one per (prompt, seed), on the CPU."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    was_training = model.training
    model.eval()
    device = model.unet.device
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(cfg.steps)
    empty = model.encode_text(model.text_encoder.tokenize([""]))
    out = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch_prompts = prompts[start : start + cfg.batch_size]
        cond = model.encode_text(model.text_encoder.tokenize(batch_prompts))
        states = torch.cat([empty.expand_as(cond), cond])
        x = initial_noise(model.sample_shape, seeds[start : start + cfg.batch_size]).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_uncond, eps_cond = model.unet(x_in, t, encoder_hidden_states=states).sample.chunk(2)
            eps = eps_uncond + cfg.guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(model.decode(x).clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """A PNG grid of images in [-1, 1], upscaled so that 16x16 digits are visible."""
    grid = to_uint8(make_grid(images, nrow=nrow, padding=1, pad_value=1.0))  # always 3 x H x W
    image = Image.fromarray(grid.transpose(1, 2, 0))
    scale = max(1, 256 // images.shape[-1])
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)
