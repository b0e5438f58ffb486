"""A model a user brings: a lethe model directory, a diffusers Stable Diffusion pipeline directory (a full
fine-tune), or such a pipeline plus LoRA weights in the form diffusers' LoRA training scripts write
(`pytorch_lora_weights.safetensors`). Local files only; diffusers' own loaders read every format.

LoRA weights are loaded with diffusers' `load_lora_into_unet` / `load_lora_into_text_encoder` (peft
underneath) and then fused into the weights, so sampling runs the plain layers at full speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from lethe.config import ModelConfig
from lethe.errors import LetheError
from lethe.models.diffusion_model import DiffusionModel, build_model, load_model


def model_kind(path: Path) -> str:
    """'lethe' (config.json + weights.safetensors) or 'diffusers' (a pipeline's unet/ beside vae/)."""
    if (path / "config.json").is_file() and (path / "weights.safetensors").is_file():
        return "lethe"
    if (path / "unet" / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return "diffusers"
    if not path.is_dir():
        raise LetheError(f"{path}: no such model directory")
    raise LetheError(f"{path}: neither a lethe model (config.json + weights.safetensors) nor a diffusers "
                     "Stable Diffusion pipeline (unet/ and vae/ with their config.json)")


def pipeline_resolution(path: Path) -> int:
    """The image size a pipeline generates: the U-Net's sample size times the VAE's downsampling."""
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_brought_model(path: str | Path, lora: str | Path | None = None) -> DiffusionModel:
    """The model at `path`, with LoRA weights fused into it when `lora` is given."""
    path = Path(path)
    kind = model_kind(path)
    if kind == "lethe":
        if lora is not None:
            raise LetheError(f"{lora}: LoRA weights need a diffusers pipeline as the base model, and {path} is a lethe model")
        return load_model(path)
    model = build_model(ModelConfig(kind="latent", pretrained_path=str(path)), pipeline_resolution(path), 3)
    if lora is not None:
        fuse_lora(model, Path(lora), path)
    return model


@contextlib.contextmanager
def _quiet(name: str):
    """diffusers logs a failed load at ERROR before raising; the raised error is the one line the user gets."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def fuse_lora(model: DiffusionModel, lora: Path, base: Path) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    if not lora.exists():
        raise LetheError(f"{lora}: no such LoRA weights file or directory")
    try:
        with _quiet("diffusers"):
            state, alphas = Loader.lora_state_dict(str(lora), local_files_only=True)
            unet_keys = [k for k in state if k.startswith("unet.")]
            text_keys = [k for k in state if k.startswith("text_encoder.")]
            if not unet_keys and not text_keys:
                raise ValueError("no 'unet.' or 'text_encoder.' LoRA keys")
            if unet_keys:
                Loader.load_lora_into_unet(state, alphas, model.unet)
                model.unet.fuse_lora()
                model.unet.unload_lora()
            if text_keys:
                from diffusers.loaders.lora_base import fuse_text_encoder_lora
                from diffusers.utils.peft_utils import recurse_remove_peft_layers

                encoder = model.text_encoder.model
                Loader.load_lora_into_text_encoder(state, alphas, encoder, prefix="text_encoder")
                fuse_text_encoder_lora(encoder)
                recurse_remove_peft_layers(encoder)  # the fused weights stay, the adapter layers go
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        reason = " ".join(str(exc).split())[:240]
        raise LetheError(f"{lora}: LoRA weights do not match the base model {base} ({reason})")
