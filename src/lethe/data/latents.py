"""VAE latents of the prepared images, encoded once per (dataset, VAE) and cached: the latent path only.

Training on a Stable Diffusion checkpoint would otherwise run the VAE encoder on every batch. Each
prepared image is encoded once, as the *mean* of the VAE's latent distribution times the VAE's scaling
factor: deterministic, and a cached seeded sample would fix one draw of the posterior's noise per image
just the same, so it would not restore the per-step resampling of an uncached run. The cache (`lethe.cache`) is a safetensors file under
`.lethe/latents/`, named by the hash of the prepared data and of the VAE's files, so a changed dataset or
VAE never reuses stale latents and every stage on the same data (pretrain, each train@method) shares one
encoding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lethe.cache import cached_tensor
from lethe.data.prepared import PreparedData
from lethe.files import content_hash
from lethe.models.diffusion_model import DiffusionModel
from lethe.paths import LATENTS

CACHE = LATENTS


def latents_key(model: DiffusionModel, data_hash: str) -> str:
    vae_hash = content_hash(Path(model.spec.model["pretrained_path"]) / "vae")
    return hashlib.sha256(f"{data_hash}:{vae_hash}:mean:tensor".encode()).hexdigest()[:20]


@torch.no_grad()
def encode_dataset(model: DiffusionModel, data: PreparedData, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Every prepared image (row order of images.npy) as scaled latent means, float32 on the CPU."""
    vae, was = model.vae, next(model.vae.parameters()).device
    vae.to(device)
    out = []
    for start in range(0, len(data.images), batch_size):
        images = data.tensor(range(start, min(start + batch_size, len(data.images)))).to(device)
        out.append((vae.encode(images).latent_dist.mean * vae.config.scaling_factor).float().cpu())
    vae.to(was)
    return torch.cat(out)


def cached_latents(model: DiffusionModel, data: PreparedData, data_hash: str, device: torch.device,
                   cache: Path = CACHE) -> torch.Tensor:
    """The dataset's latents from the cache, encoding (and caching) them first if they are not there."""
    return cached_tensor(cache / f"{latents_key(model, data_hash)}.safetensors",
                         lambda: encode_dataset(model, data, device))
