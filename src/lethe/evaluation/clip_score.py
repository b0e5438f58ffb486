"""CLIP score from a local open_clip model: 100 x the cosine similarity of image and caption embeddings,
clipped at 0 (the definition torchmetrics' CLIPScore uses; that class downloads its weights, this one
reads `evaluate.clip_model_path`). Reported as `quality/clip_score/<group>`, the mean over generations.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lethe.errors import LetheError
from lethe.memorization.features import load_open_clip

ClipScore = Callable[[torch.Tensor, list[str]], torch.Tensor]


def load_clip_score(path: str, model_name: str, device: torch.device | str = "cpu", batch_size: int = 64) -> ClipScore:
    """A function from images in [-1, 1] and their prompts to one CLIP score per image."""
    import open_clip

    model, preprocess = load_open_clip(model_name, path, "evaluate.clip_model_path", device)
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that would need a download fails here, offline
        raise LetheError(f"evaluate.open_clip_model: no local tokenizer for '{model_name}' ({type(exc).__name__})")

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for s in range(0, len(images), batch_size):
            image = F.normalize(model.encode_image(preprocess(images[s : s + batch_size])).float(), dim=-1)
            text = F.normalize(model.encode_text(tokenizer(prompts[s : s + batch_size]).to(device)).float(), dim=-1)
            out.append((100 * (image * text).sum(-1)).clamp(min=0).cpu())
        return torch.cat(out)

    return score
