"""A randomly initialised Stable-Diffusion-shaped checkpoint, built from configs and saved in diffusers layout.

No machine here reaches a model hub, so the latent path is tested and benchmarked on one of these: a VAE,
a CLIP text encoder with a byte-level tokenizer (no merges), a U-Net and a scheduler; and on a folder of
random captioned images to train it on (`write_image_folder`). `tiny` is a few
hundred kB (the tests); `sd15` has Stable Diffusion 1.5's shapes (860M-parameter U-Net, 84M VAE, the
12-layer text encoder: 85M with this 514-token vocabulary, 123M with CLIP's), for `benchmarks/sd_scale.py`. Random weights: speed and memory are real, images are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
        context_length=16,
    ),
    "sd15": dict(  # runwayml/stable-diffusion-v1-5's configs
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                  norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        context_length=77,
    ),
}


def byte_vocabulary() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and as a word end: a tokenizer with no merges."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def build_random_sd(path: Path, image_size: int = 16, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random checkpoint of `size` (tiny or sd15) for images of `image_size` pixels into `path`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shapes = SIZES[size]
    torch.manual_seed(seed)
    path = Path(path)
    vocab = byte_vocabulary()
    context = shapes["context_length"]
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "tokenizer/vocab.json"), str(path / "tokenizer/merges.txt"),
                  model_max_length=context).save_pretrained(path / "tokenizer")
    text = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=context, bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **shapes["text"])
    CLIPTextModel(text).save_pretrained(path / "text_encoder")
    levels = len(shapes["vae"]["block_out_channels"])
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  **shapes["vae"]).save_pretrained(path / "vae")
    UNet2DConditionModel(sample_size=image_size // 2 ** (levels - 1), in_channels=4, out_channels=4,
                         cross_attention_dim=text.hidden_size, **shapes["unet"]).save_pretrained(path / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(path / "scheduler")
    return path


def write_image_folder(folder: Path, n: int = 24, size: int = 16) -> Path:
    """RGB noise images with metadata.jsonl (file_name, text), the Hugging Face image-folder layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["square", "stripe", "ring", "cross"]
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(n):
            pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")
            caption = f"a {colours[i % 6]} {shapes[i % 4]} number {i}"
            handle.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return folder
