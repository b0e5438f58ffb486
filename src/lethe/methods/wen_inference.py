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
    target: float | None = Field(None, gt=0.0)  # stop below this magnitude; null: the tune split's mean from detect ...
    target_fraction: float = Field(1.0, gt=0.0, le=1.0)  # ... times this (below 1: push memorized prompts further)


def tune_magnitude(path=DETECT_METRICS) -> float:
    """The default target: the mean first-step magnitude of the tune split's prompts (never trained on, never
    judged), as `detect` measured it."""
    if not path.exists():
        raise LetheError(f"{path}: not found; run `dvc repro detect` or set wen_inference.target")
    measured = json.loads(path.read_text())
    if "detection/wen_first/mean/tune" not in measured:
        raise LetheError(f"{path}: no tune-split magnitude (data.tune_size is 0, or an older detect); set data.tune_size "
                         "and run `dvc repro detect`, or set wen_inference.target")
    return measured["detection/wen_first/mean/tune"]


def settings(params) -> dict:
    cfg = params.wen_inference
    target = cfg.target if cfg.target is not None else cfg.target_fraction * tune_magnitude()
    return {"lr": cfg.lr, "iterations": cfg.iterations, "target": target}


def optimise(unet, t, x_t, cond, empty, settings: dict):
    from lethe.inference.prompt_embedding import optimise_prompt_embedding

    return optimise_prompt_embedding(unet, t, x_t, cond, empty, **settings)


METHOD = InferenceMitigation("wen_inference", "prompt embedding optimised", acts="embedding", stage="mitigate",
                             section="wen_inference", schema=WenInferenceConfig, reads=("wen_inference",),
                             needs=(str(DETECT_METRICS),), settings=settings, on_embedding=optimise)
