"""The blind choice of the random-skip controls (`lethe.methods.random_skip`), and the factory of the
control of one method, `random_skip_<method>`: that method's training structure (IET-AGC's proxies,
shards and averaging; plain fine-tuning otherwise) with its choice of which samples to skip replaced by
a random one of the same share at each step, drawn from `finetune.seed`.

Light on purpose, like the declarations: torch is imported when a choice is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from lethe.declarations import TrainingMethod
from lethe.errors import LetheError
from lethe.paths import model_dir


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
        raise LetheError(f"{path}: the random-skip control of {method!r} needs its skip curve ({error}); "
                         f"run train@{method} first")
    if not isinstance(curve, list) or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in curve):
        raise LetheError(f"{path}: not a list of skipped shares in [0, 1]")
    return [float(v) for v in curve]


def plain_fine_tuning(params, model, scheduler, samples: int, keep: RandomSkip):
    """Fine-tuning that trains on the samples `keep` keeps at each step."""
    from lethe.training.module import DiffusionTraining

    return DiffusionTraining(model, scheduler, params.finetune, keep=keep)


def control(method: str, reads: tuple[str, ...] = (), needs: tuple[str, ...] = (), structure=None) -> TrainingMethod:
    """`random_skip_<method>`: the share `method` skipped at each step, dropped at random, in the training
    `structure(params, model, scheduler, samples, keep)` builds (default: plain fine-tuning)."""
    def training(params, model, scheduler, samples: int):
        keep = RandomSkip(followed_curve(method), params.finetune.seed)
        return (structure or plain_fine_tuning)(params, model, scheduler, samples, keep)

    return TrainingMethod(f"random_skip_{method}", f"{method}'s skipped share, dropped at random (control)",
                          reads=reads, needs=(*needs, str(model_dir(method))), training=training,
                          inputs=lambda params: (*needs, str(curve_file(method))), controls=lambda params: method)
