"""LoyalDiffusion's two choices, measured rather than fixed (Li et al., arXiv 2412.01118): which skip
connections get transfer blocks, and from which timestep on the RAU-Net denoises.

- **Skips.** The pretrained model generates for the holdout prompts with every skip intact, then once
  per skip with that skip zeroed (the same prompts and seeds). A skip's importance for quality is the FD
  change it causes; the `skip_share` least essential skips get the blocks, so the blocks cost the least
  quality where they go.
- **Timestep split.** Each planted training image (the dup group) and each holdout image is noised to t
  and denoised by the baseline with its own caption. A result is a copy of its source when their
  features' cosine similarity reaches the calibrated threshold (`calibration/sim/threshold`). A holdout
  image, never trained on, comes back only through what its noisy input still carries; a planted one also
  through what the model remembers. Their gap in copy rate is memorization at t; tau is the smallest t
  where the gap reaches `gap_share` of its peak, so the RAU-Net covers the steps where memory, not the
  input, decides the image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lethe.diffusion import guide, guided_pass, noised
from lethe.evaluation.intervals import mean_of, paired, with_interval
from lethe.evaluation.intervals import per_prompt as prompt_means
from lethe.models.raunet import skip_channels
from lethe.progress import progress
from lethe.sampling import generate, initial_noise, sampling_scheduler


def all_skips(unet) -> list[tuple[int, int]]:
    """Every skip connection as (up-block level, index in the tuple it receives), deepest level first."""
    return [(level, i) for level, channels in enumerate(skip_channels(unet)) for i in range(len(channels))]


@contextlib.contextmanager
def dropped(unet, skip: tuple[int, int] | None):
    """The U-Net with one skip tensor zeroed before its up block concatenates it (None: all intact)."""
    if skip is None:
        yield
        return
    level, index = skip

    def zero(_, args, kwargs):
        skips = list(kwargs["res_hidden_states_tuple"])
        skips[index] = torch.zeros_like(skips[index])
        kwargs["res_hidden_states_tuple"] = tuple(skips)
        return args, kwargs

    handle = unet.up_blocks[level].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_without(model, train_scheduler, skip: tuple[int, int] | None, prompts: list[str], seeds: list[int],
                     cfg, who: str) -> torch.Tensor:
    """`lethe.sampling.generate` with one skip zeroed (None: intact), its progress labelled by model and skip."""
    with dropped(model.unet, skip):
        label = f"select_loyal: {who}, " + ("intact" if skip is None else f"skip {list(skip)} zeroed")
        return generate(model, train_scheduler, prompts, seeds, cfg, label=label)


def skip_importance(generate_features, skips: list[tuple[int, int]], distances, n_prompts: int, per_prompt: int,
                    bootstrap: int) -> list[dict]:
    """Per skip: the FD of generations with it zeroed against the intact model's, on the same prompts and
    seeds, with the half-sample interval of the relative change (`intervals.paired`).

    `generate_features(skip)` returns the features of the generations with that skip zeroed (None: intact),
    prompt-major with `per_prompt` generations each."""
    def fd_of(features):
        return lambda rows: distances.frechet(features.view(n_prompts, per_prompt, -1)[torch.as_tensor(rows)].flatten(0, 1))

    intact_fd, memo = fd_of(generate_features(None)), {}

    def intact(rows):  # the same half-samples for every skip: the intact model's FD on each, computed once
        key = np.asarray(rows).tobytes()
        if key not in memo:
            memo[key] = intact_fd(rows)
        return memo[key]

    rows = []
    for skip in skips:
        figures = paired("fd", fd_of(generate_features(skip)), intact, n_prompts, bootstrap, method="halves")
        rows.append({"skip": list(skip), "fd_intact": intact(np.arange(n_prompts)),
                     "fd_change": figures["vs_baseline/fd/diff"], "fd_relative": figures["vs_baseline/fd"],
                     "fd_relative_low": figures["vs_baseline/fd/ci_low"], "fd_relative_high": figures["vs_baseline/fd/ci_high"]})
    return rows


def replication_sensitivity(copied_with, skips: list[tuple[int, int]], n_prompts: int, per_prompt: int,
                            bootstrap: int) -> dict[tuple[int, int], dict]:
    """Per skip: the change of the baseline's replication rate on the planted prompts when that skip is
    zeroed, paired over prompts with the intact baseline's (bootstrap interval). `copied_with(skip)` returns
    each generation's copy flag (None: intact), prompt-major."""
    intact = prompt_means(copied_with(None), per_prompt)
    out = {}
    for skip in skips:
        figures = paired("rate", mean_of(prompt_means(copied_with(skip), per_prompt)), mean_of(intact), n_prompts, bootstrap)
        out[skip] = {"replication_intact": float(intact.mean()), "replication_change": figures["vs_baseline/rate/diff"],
                     "replication_change_low": figures["vs_baseline/rate/diff/ci_low"],
                     "replication_change_high": figures["vs_baseline/rate/diff/ci_high"]}
    return out


def choose_skips(importance: list[dict], share: float, by: str = "quality") -> list[tuple[int, int]]:
    """The `share` of the skips (at least one): by `quality`, those whose removal raises FD least; by
    `replication`, those whose removal lowers the baseline's replication most (then FD least)."""
    count = max(1, round(share * len(importance)))
    if by == "quality":
        ranked = sorted(importance, key=lambda row: (row["fd_change"], row["skip"]))
    else:
        ranked = sorted(importance, key=lambda row: (row["replication_change"], row["fd_change"], row["skip"]))
    return sorted(tuple(row["skip"]) for row in ranked[:count])


def analysis_timesteps(train_scheduler, steps: int, points: int) -> list[int]:
    """`points` timesteps of the sampler's schedule, evenly spread, ascending: the split is a sampling step."""
    timesteps = sorted(int(t) for t in sampling_scheduler(train_scheduler, steps).timesteps)
    picks = np.unique(np.linspace(0, len(timesteps) - 1, min(points, len(timesteps))).round().astype(int))
    return [timesteps[i] for i in picks]


@torch.no_grad()
def denoise_from(model, train_scheduler, images: torch.Tensor, captions: list[str], t: int, steps: int,
                 guidance_scale: float, batch_size: int) -> torch.Tensor:
    """Each image noised to timestep t (its own seed: its index) and denoised by guided DDIM over the sampler's
    steps at or below t, conditioned on its caption. Images in [-1, 1], on the CPU."""
    scheduler = sampling_scheduler(train_scheduler, steps)
    if t not in scheduler.timesteps:
        raise ValueError(f"t = {t} is not one of the sampler's timesteps")
    timesteps = [s for s in scheduler.timesteps if s <= t]
    model.eval()
    device = model.unet.device
    empty = model.encode_text(model.text_encoder.tokenize([""]))
    out = []
    for start in range(0, len(images), batch_size):
        x0 = model.encode_images(images[start : start + batch_size].to(device))
        noise = initial_noise(model.sample_shape, list(range(start, start + len(x0)))).to(device)
        x = noised(train_scheduler, x0, noise, torch.full((len(x0),), t, device=device))[0]
        cond = model.encode_text(model.text_encoder.tokenize(captions[start : start + batch_size]))
        for s in timesteps:
            eps_uncond, eps_cond = guided_pass(model.unet, x, s, cond, empty.expand_as(cond))
            x = scheduler.step(guide(eps_uncond, eps_cond, guidance_scale), s, x).prev_sample
        out.append(model.decode(x).clamp(-1, 1).cpu())
    return torch.cat(out)


def copied_from_source(featurize, outputs: torch.Tensor, sources: torch.Tensor, threshold: float) -> np.ndarray:
    """Whether each output is a copy of its own source: cosine similarity of their features at or above the threshold."""
    return (F.cosine_similarity(featurize(outputs), featurize(sources), dim=1) >= threshold).numpy()


@dataclass
class Group:
    """Images to noise and denoise with their captions: the planted training images, or the holdout ones."""

    name: str
    images: torch.Tensor
    captions: list[str]


def memorization_over_t(denoise, featurize, groups: list[Group], timesteps: list[int], threshold: float,
                        bootstrap: int) -> list[dict]:
    """Per t: each group's copy rate with its 95% interval over images, and the gap between the first group
    (planted) and the second (holdout). `denoise(images, captions, t)` is `denoise_from` with the model bound."""
    rows = []
    for t in progress(timesteps, desc="select_loyal: noise levels", unit="t"):
        row: dict = {"t": t}
        for group in groups:
            copied = copied_from_source(featurize, denoise(group.images, group.captions, t), group.images, threshold)
            row |= with_interval(group.name, mean_of(copied), len(copied), bootstrap)
        row["gap"] = row[groups[0].name] - row[groups[1].name]
        rows.append(row)
    return rows


def split_at(rows: list[dict], gap_share: float) -> int | None:
    """The smallest t > 0 whose gap reaches `gap_share` of the largest gap; None when no t shows a positive
    gap. t = 0 (nothing noised) never splits: tau 0 would mean the RAU-Net at every step, train@raunet."""
    rows = [row for row in rows if row["t"] > 0]
    peak = max((row["gap"] for row in rows), default=0.0)
    if peak <= 0:
        return None
    return min(row["t"] for row in rows if row["gap"] >= gap_share * peak)
