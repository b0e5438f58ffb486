"""The control for every skipping method: drop a share of the samples at random, whatever they are.

A skipping mitigation (anti-gradient control, Wen's filter, MemAttn's filter) trains on fewer
per-sample gradients than plain fine-tuning. This method drops the same share blindly, so that beside
it a mitigation shows what its choice of *which* samples to drop buys over "trained on fewer samples".
With `follows`, it drops at each step the share the followed method skipped at that step (its
`models/<method>/skipped_per_step.json`, which `dvc.yaml` makes a dependency); without, `share` at
every step. Each step drops round(share × batch) samples, drawn from (seed, step), so a resumed run
drops exactly the samples an uninterrupted one would, and every rank of a DDP run agrees on the global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

from lethe.declarations import Section, TrainingMethod
from lethe.errors import LetheError
from lethe.paths import model_dir


class RandomSkipConfig(Section):
    follows: str | None = "wen_filter"  # the method whose per-step skipped share is copied; null: `share`
    share: float = Field(0.2, ge=0.0, lt=1.0)  # of each batch's samples, dropped at random when follows is null
    seed: int = 0

    @field_validator("follows")
    @classmethod
    def _not_itself(cls, value):
        if value == "random_skip":
            raise ValueError("the control cannot follow itself")
        return value


class RandomSkip:
    def __init__(self, shares: list[float] | float, seed: int):
        self.shares, self.seed = shares, seed

    def share(self, step: int) -> float:
        if isinstance(self.shares, float):
            return self.shares
        return self.shares[step] if step < len(self.shares) else 0.0

    def __call__(self, step: int, total: int):
        """Which of the global batch's `total` samples to keep at `step`."""
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        dropped = torch.randperm(total, generator=generator)[: round(self.share(step) * total)]
        keep = torch.ones(total, dtype=torch.bool)
        keep[dropped] = False
        return keep


def curve_file(method: str) -> Path:
    return model_dir(method) / "skipped_per_step.json"


def followed_curve(method: str) -> list[float]:
    path = curve_file(method)
    try:
        curve = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LetheError(f"{path}: random_skip.follows = {method!r} needs its skip curve ({error}); run train@{method} first")
    if not isinstance(curve, list) or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in curve):
        raise LetheError(f"{path}: not a list of skipped shares in [0, 1]")
    return [float(v) for v in curve]


def training(params, model, scheduler, samples: int):
    from lethe.training.module import DiffusionTraining

    cfg = params.random_skip
    shares = followed_curve(cfg.follows) if cfg.follows else cfg.share
    return DiffusionTraining(model, scheduler, params.finetune, keep=RandomSkip(shares, cfg.seed))


METHOD = TrainingMethod("random_skip", "a random share of samples skipped (control)", section="random_skip",
                        schema=RandomSkipConfig, reads=("random_skip",), training=training,
                        inputs=lambda params: (str(curve_file(params.random_skip.follows)),)
                        if params.random_skip.follows else ())
