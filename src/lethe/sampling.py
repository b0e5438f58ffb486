"""Generate images: DDIM (η = 0) through diffusers' scheduler, classifier-free guidance, batched.

Each prompt's starting noise comes from its own seed on the CPU, so a (prompt, seed) pair gives the
same image whatever the batch it lands in and whatever the device.

A model's inference-time mitigations travel in its config (`spec.inference`) and are applied here,
where each one's declaration (`lethe.methods`) says it acts: on the text embedding before the loop
(Wen's prompt-embedding optimisation), or in cross-attention during it (MemAttn's steering). So the
packaged model is the mitigated model. A `SamplingTrace` records, for detection,
what guided sampling computes anyway: Wen's noise magnitude and the conditional branch's
cross-attention maps at every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from PIL import Image
from torchvision.utils import make_grid

from lethe.config import SampleConfig
from lethe.data.prepared import to_uint8
from lethe.diffusion import guide, guided_pass, noise_magnitude
from lethe.memorization.attention import attention_control
from lethe.methods import inference_mitigation
from lethe.models.diffusion_model import DiffusionModel
from lethe.progress import progress


@dataclass
class SamplingTrace:
    """Per prompt and step: noise magnitude (N x steps) and attention maps per layer (N x steps x tokens)."""

    attention: bool = True
    ids: list[torch.Tensor] = field(default_factory=list)
    _magnitudes: list[list[torch.Tensor]] = field(default_factory=list)
    _maps: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)

    def start_batch(self, ids: torch.Tensor) -> None:
        self.ids.append(ids)
        self._magnitudes.append([])
        self._maps.append([])

    def record(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, maps: dict[str, torch.Tensor]) -> None:
        n = len(eps_cond)
        self._magnitudes[-1].append(noise_magnitude(eps_cond, eps_uncond).cpu())
        self._maps[-1].append({layer: m[-n:].cpu() for layer, m in maps.items()})  # the conditional rows

    @property
    def magnitudes(self) -> torch.Tensor:
        return torch.cat([torch.stack(steps, 1) for steps in self._magnitudes])

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        layers = self._maps[0][0].keys() if self._maps and self._maps[0] else []
        return {layer: torch.cat([torch.stack([s[layer] for s in steps], 1) for steps in self._maps]) for layer in layers}

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.cat(self.ids)


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sampling_scheduler(train_scheduler: SchedulerMixin, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def first_step(model: DiffusionModel, train_scheduler: SchedulerMixin, steps: int, seeds: int):
    """The sampler's first timestep and one starting noise per seed (Wen's inputs)."""
    return timestep_and_noise(model, train_scheduler, steps, 0, seeds)


def timestep_and_noise(model: DiffusionModel, train_scheduler: SchedulerMixin, steps: int, index: int, seeds: int):
    """The `index`-th timestep of a `steps`-step DDIM schedule and the starting noises of seeds 0..seeds-1."""
    return sampling_scheduler(train_scheduler, steps).timesteps[index], initial_noise(model.sample_shape, list(range(seeds)))


# NeMo's code scores ε̂(x_T, t, c) − x_T at the second timestep of a 50-step DDIM schedule, on the starting
# noise itself (its loop stops at i = 1 and never steps the latents): t = 961 on Stable Diffusion's schedule
NEMO_SCHEDULE_STEPS, NEMO_STEP_INDEX = 50, 1


def nemo_step(model: DiffusionModel, train_scheduler: SchedulerMixin, seeds: int):
    """NeMo's timestep and one starting noise per seed."""
    return timestep_and_noise(model, train_scheduler, NEMO_SCHEDULE_STEPS, NEMO_STEP_INDEX, seeds)


@torch.no_grad()
def generate(
    model: DiffusionModel, train_scheduler: SchedulerMixin, prompts: list[str], seeds: list[int], cfg: SampleConfig,
    trace: SamplingTrace | None = None, label: str | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], one per (prompt, seed), on the CPU; with a `label`, its progress over the denoising
    steps of every batch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    was_training = model.training
    model.eval()
    device = model.unet.device
    scheduler = sampling_scheduler(train_scheduler, cfg.steps)
    mitigations = [(inference_mitigation(name), settings) for name, settings in model.spec.inference.items()]
    on_embedding = [(m.on_embedding, s) for m, s in mitigations if m.acts == "embedding"]
    in_attention = [(m.in_attention, s) for m, s in mitigations if m.acts == "attention"]
    capture = trace is not None and trace.attention
    control = attention_control(model) if capture or in_attention else None
    empty = model.encode_text(model.text_encoder.tokenize([""]))
    bf16 = cfg.precision == "bf16-mixed"
    out = []
    batches = -(-len(prompts) // cfg.batch_size)
    bar = progress(total=batches * len(scheduler.timesteps), desc=label, unit="step") if label else None
    for start in range(0, len(prompts), cfg.batch_size):
        ids = model.text_encoder.tokenize(prompts[start : start + cfg.batch_size])
        cond = model.encode_text(ids)
        x = initial_noise(model.sample_shape, seeds[start : start + cfg.batch_size]).to(device) * scheduler.init_noise_sigma
        t0 = scheduler.timesteps[0]
        for optimise, settings in on_embedding:
            cond = optimise(model.unet, t0, scheduler.scale_model_input(x, t0), cond, empty, settings)
        if trace is not None:
            trace.start_batch(ids)
        with contextlib.ExitStack() as stack:
            for steer, settings in in_attention:
                stack.enter_context(steer(control, ids, model.text_encoder.end_token_id, settings))
            if capture:
                stack.enter_context(control.capturing())
            for t in scheduler.timesteps:
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    eps_uncond, eps_cond = guided_pass(model.unet, scheduler.scale_model_input(x, t), t, cond,
                                                       empty.expand_as(cond))
                eps_uncond, eps_cond = eps_uncond.float(), eps_cond.float()
                if trace is not None:
                    trace.record(eps_cond, eps_uncond, control.captured if capture else {})
                x = scheduler.step(guide(eps_uncond, eps_cond, cfg.guidance_scale), t, x).prev_sample
                if bar is not None:
                    bar.update()
        out.append(model.decode(x).clamp(-1, 1).cpu())
    if bar is not None:
        bar.close()
    model.train(was_training)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """A PNG grid of images in [-1, 1], upscaled so that 16x16 digits are visible."""
    grid = to_uint8(make_grid(images, nrow=nrow, padding=1, pad_value=1.0))  # always 3 x H x W
    image = Image.fromarray(grid.transpose(1, 2, 0))
    scale = max(1, 256 // images.shape[-1])
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)
