"""Wen et al.'s inference-time mitigation: optimise the prompt embedding at the first step, before sampling."""

from __future__ import annotations

import json

from pydantic import Field

from lethe.declarations import InferenceMitigation, Section
from lethe.errors import LetheError
from lethe.paths import DETECT_METRICS


class WenInferenceConfig(Section):
    lr: float = Field(0.05, gt=0.0)
    iterations: int = Field(10, ge=1)
    target: float | None = Field(None, gt=0.0)  # stop below this magnitude; null: holdout prompts' mean from detect ...
    target_fraction: float = Field(1.0, gt=0.0, le=1.0)  # ... times this (below 1: push memorized prompts further)


def holdout_magnitude(path=DETECT_METRICS) -> float:
    """The default target: the mean first-step magnitude of holdout prompts, as `detect` measured it."""
    if not path.exists():
        raise LetheError(f"{path}: not found; run `dvc repro detect` or set wen_inference.target")
    return json.loads(path.read_text())["detection/wen_first/mean/holdout"]


def settings(params) -> dict:
    cfg = params.wen_inference
    target = cfg.target if cfg.target is not None else cfg.target_fraction * holdout_magnitude()
    return {"lr": cfg.lr, "iterations": cfg.iterations, "target": target}


def optimise(unet, t, x_t, cond, empty, settings: dict):
    from lethe.inference.prompt_embedding import optimise_prompt_embedding

    return optimise_prompt_embedding(unet, t, x_t, cond, empty, **settings)


METHOD = InferenceMitigation("wen_inference", "prompt embedding optimised", acts="embedding", stage="mitigate",
                             section="wen_inference", schema=WenInferenceConfig, reads=("wen_inference",),
                             needs=(str(DETECT_METRICS),), settings=settings, on_embedding=optimise)
