"""Feature spaces for replication metrics, chosen in params: pixels, the featurizer, SSCD, open_clip.

Each loader returns a function from images in [-1, 1] (N x C x H x W) to N x D features, applied in
batches. SSCD and open_clip weights come from local files only (no machine here reaches a hub); SSCD
is a TorchScript file, open_clip a state dict loaded through `pretrained=<path>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lethe.errors import LetheError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Features = Callable[[torch.Tensor], torch.Tensor]


def _rgb(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] images to a network's expected 3-channel, normalised, resized input."""
    x = (images.float() + 1) / 2
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)


def batched(fn: Features, batch_size: int = 256, device: torch.device | str = "cpu") -> Features:
    """Apply `fn` in batches on `device`; features come back as float32 on the CPU."""
    @torch.no_grad()
    def apply(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(images[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(images), batch_size)])

    return apply


def load_open_clip(name: str, path: str | None, key: str, device: torch.device | str = "cpu"):
    """An open_clip model from a local weights file (`pretrained=` that path) and its image preprocessing."""
    import open_clip

    if not path or not Path(path).is_file():
        raise LetheError(f"{key}: '{path}' is not a file; open_clip needs a local weights file")
    try:
        model = open_clip.create_model(name, pretrained=path, require_pretrained=True).to(device).eval()
    except (RuntimeError, ValueError) as exc:
        raise LetheError(f"{key}: '{path}' does not load as open_clip model '{name}' ({str(exc).splitlines()[0][:200]})")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    mean, std = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return model, lambda x: _rgb(x.to(device), size, mean, std)


def load_features(kind: str, path: str | None = None, open_clip_model: str = "ViT-B-32",
                  device: torch.device | str = "cpu") -> Features:
    """`device` is where SSCD and open_clip run (pixels and the small featurizer stay on the CPU)."""
    if kind == "pixels":
        return batched(lambda x: x.flatten(1).float())
    if kind == "featurizer":
        from lethe.evaluation.featurizer import load_featurizer
        from lethe.paths import FEATURIZER

        return batched(load_featurizer(path or FEATURIZER))
    if not path or not Path(path).is_file():
        raise LetheError(f"evaluate.features_path: '{path}' is not a file; {kind} features need local weights")
    if kind == "sscd":
        try:
            model = torch.jit.load(path, map_location=device).eval()  # TorchScript, not a pickle
        except RuntimeError as exc:
            raise LetheError(f"evaluate.features_path: '{path}' is not a TorchScript file ({str(exc).splitlines()[0][:200]})")
        return batched(lambda x: model(_rgb(x, 288, IMAGENET_MEAN, IMAGENET_STD)), device=device)
    if kind == "open_clip":
        model, preprocess = load_open_clip(open_clip_model, path, "evaluate.features_path", device)
        return batched(lambda x: model.encode_image(preprocess(x)), device=device)
    raise LetheError(f"evaluate.features: unknown kind '{kind}' (pixels, featurizer, sscd, open_clip)")
