"""Build, save and load the text-to-image model at either scale through one interface.

`DiffusionModel` bundles the denoising U-Net, a text encoder and, on the latent path, a frozen VAE.
Pixel path: a small `UNet2DConditionModel` on the images themselves. Latent path: a Stable Diffusion
checkpoint in diffusers format from a local directory. A saved model is `config.json` plus
`weights.safetensors` (the trainable parts); loading builds from the config, then loads the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from lethe.config import DiffusionConfig, ModelConfig
from lethe.errors import LetheError
from lethe.models.raunet import level_skips, with_raunet
from lethe.models.text import ClipTextEncoder, SmallTextEncoder


@dataclass
class ModelSpec:
    """Everything needed to rebuild a saved model; saved as its config.json."""

    model: dict  # the `model` params section it was built from
    resolution: int
    channels: int
    save_text_encoder: bool  # the weights file holds the text encoder too (pixel path, or a fine-tuned one)
    vocabulary: list[int] | None = None  # the pixel path's token ids, in embedding order
    raunet: dict | None = None  # LoyalDiffusion's blocks: block, skips, tau, init
    inference: dict[str, dict] = field(default_factory=dict)  # inference-time mitigation -> its settings

    def to_json(self) -> dict:
        out = {"model": self.model, "resolution": self.resolution, "channels": self.channels}
        if self.vocabulary is not None:
            out["vocabulary"] = self.vocabulary
        out["save_text_encoder"] = self.save_text_encoder
        if self.raunet is not None:
            out["raunet"] = self.raunet
        if self.inference:
            out["inference"] = self.inference
        return out

    @classmethod
    def from_json(cls, spec: dict) -> "ModelSpec":
        return cls(spec["model"], spec["resolution"], spec["channels"], spec["save_text_encoder"], spec.get("vocabulary"),
                   spec.get("raunet"), spec.get("inference", {}))


class DiffusionModel(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module, vae: AutoencoderKL | None, spec: ModelSpec):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.spec = spec
        if vae is not None:
            vae.requires_grad_(False)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape the U-Net denoises: image or latent channels and size."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to what the U-Net denoises: the VAE's latent mean, as the cached training latents
        (`data/latents.py`), so that every score computed from it is deterministic."""
        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return samples
        with torch.no_grad():
            return self.vae.decode(samples / self.vae.config.scaling_factor).sample

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.unet.device))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """U-Net always; the text encoder on the pixel path or where it is fine-tuned; never the VAE."""
        keep = ("unet.", "text_encoder.") if self.spec.save_text_encoder else ("unet.",)
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(keep)}


def in_forward_order(names: list[str]) -> list[str]:
    """U-Net module names in the order a forward pass visits them: down, mid, up (named_modules visits the
    mid block last, after the up blocks)."""
    order, wrappers = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}, {}

    def key(name: str) -> tuple[int, int]:
        # a wrapped U-Net's modules read `unet.down_blocks...`, a router's `high.up_blocks...`: each wrapper's
        # modules stay together, in the order the wrappers come, each in forward order
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part in order), len(parts))
        return wrappers.setdefault(".".join(parts[:at]), len(wrappers)), order.get(parts[at], 3) if at < len(parts) else 3

    return sorted(names, key=key)


def build_model(cfg: ModelConfig, resolution: int, channels: int, vocabulary: list[int] | None = None) -> DiffusionModel:
    """A fresh model: random pixel-space U-Net and text encoder, or a local Stable Diffusion checkpoint."""
    spec = dict(model=cfg.model_dump(mode="json"), resolution=resolution, channels=channels)
    if cfg.kind == "latent":
        path = Path(cfg.pretrained_path)
        if not (path / "unet" / "config.json").exists():
            raise LetheError(f"{path}: not a diffusers Stable Diffusion directory (no unet/config.json)")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        return DiffusionModel(unet, ClipTextEncoder(str(path)), vae, ModelSpec(**spec, save_text_encoder=False))
    if vocabulary is None:
        raise ValueError("the pixel model's text encoder needs the corpus vocabulary")
    text = SmallTextEncoder(vocabulary, cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length,
                            cfg.text.pad_with_end)
    u = cfg.unet
    unet = UNet2DConditionModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        down_block_types=u.down_block_types,
        up_block_types=u.up_block_types,
        cross_attention_dim=text.dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )
    return DiffusionModel(unet, text, None, ModelSpec(**spec, save_text_encoder=True, vocabulary=vocabulary))


def add_raunet(model: DiffusionModel, block: str, skips=None, tau: int = 0, init: str = "random", levels=None) -> None:
    """Give the model LoyalDiffusion's denoiser (RAU-Net, routed by t unless tau is 0), recorded in its spec.
    `skips` are (level, index) pairs; `levels` (a config saved before skips were chosen one by one) means all
    the skips of those levels."""
    skips = [tuple(s) for s in skips] if skips is not None else level_skips(model.unet, levels or ())
    model.unet = with_raunet(model.unet, block, skips, tau, init)
    model.spec.raunet = {"block": block, "skips": [list(s) for s in skips], "tau": tau, "init": init}


def build_scheduler(model: DiffusionModel, cfg: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule: the checkpoint's own on the latent path, params' on the pixel path."""
    if model.vae is not None:
        path = Path(model.spec.model["pretrained_path"])
        if (path / "scheduler" / "scheduler_config.json").exists():
            return DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end)


def save_model(model: DiffusionModel, path: str | Path, **extra) -> None:
    """Write config.json and weights.safetensors into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), path / "weights.safetensors")
    (path / "config.json").write_text(json.dumps({**model.spec.to_json(), **extra}, indent=2) + "\n")


def load_model(path: str | Path) -> DiffusionModel:
    """Rebuild a saved model from its config and load its weights (safetensors only, no pickles)."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "weights.safetensors").exists():
        raise LetheError(f"{path}: no saved model (config.json and weights.safetensors); run its stage first")
    spec = ModelSpec.from_json(json.loads((path / "config.json").read_text()))
    model = build_model(ModelConfig(**spec.model), spec.resolution, spec.channels, spec.vocabulary)
    model.spec.save_text_encoder = spec.save_text_encoder
    model.spec.inference = spec.inference  # inference-time mitigations, applied by lethe.sampling.generate
    if spec.raunet is not None:
        add_raunet(model, **spec.raunet)
    missing, unexpected = model.load_state_dict(load_file(path / "weights.safetensors"), strict=False)
    wrong = [k for k in missing if k.startswith("unet.") or (spec.save_text_encoder and k.startswith("text_encoder."))]
    if wrong or unexpected:
        raise LetheError(f"{path / 'weights.safetensors'}: does not match config.json ({(wrong + unexpected)[:3]})")
    return model
