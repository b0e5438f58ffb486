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
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def batched(fn: Features, batch_size: int = 256) -> Features:
    @torch.no_grad()
    def apply(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])

    return apply


def load_features(kind: str, path: str | None = None, open_clip_model: str = "ViT-B-32") -> Features:
    if kind == "pixels":
        return batched(lambda x: x.flatten(1).float())
    if kind == "featurizer":
        from lethe.evaluation.featurizer import load_featurizer

        return batched(load_featurizer(path or "models/featurizer"))
    if not path or not Path(path).is_file():
        raise LetheError(f"evaluate.features_path: '{path}' is not a file; {kind} features need local weights")
    if kind == "sscd":
        model = torch.jit.load(path, map_location="cpu").eval()  # TorchScript, not a pickle
        return batched(lambda x: model(_rgb(x, 288, IMAGENET_MEAN, IMAGENET_STD)))
    if kind == "open_clip":
        import open_clip

        model = open_clip.create_model(open_clip_model, pretrained=path).eval()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return batched(lambda x: model.encode_image(_rgb(x, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)))
    raise LetheError(f"evaluate.features: unknown kind '{kind}' (pixels, featurizer, sscd, open_clip)")
