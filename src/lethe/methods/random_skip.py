"""The control for every skipping method: drop a share of the samples at random, whatever they are.

A skipping mitigation (anti-gradient control, Wen's filter, MemAttn's filter) trains on fewer
per-sample gradients than plain fine-tuning. This method drops the same share blindly, so that beside
it a mitigation shows what its choice of *which* samples to drop buys over "trained on fewer samples".
Each step's draw comes from (seed, step), so a resumed run drops exactly the samples an uninterrupted
one would, and every rank of a DDP run agrees on the global batch.
"""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import Section, TrainingMethod


class RandomSkipConfig(Section):
    share: float = Field(0.2, ge=0.0, lt=1.0)  # of each batch's samples, dropped at random
    seed: int = 0


class RandomSkip:
    def __init__(self, share: float, seed: int):
        self.share, self.seed = share, seed

    def __call__(self, step: int, total: int):
        """Which of the global batch's `total` samples to keep at `step`."""
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.rand(total, generator=generator) >= self.share


def training(params, model, scheduler, samples: int):
    from lethe.training.module import DiffusionTraining

    cfg = params.random_skip
    return DiffusionTraining(model, scheduler, params.finetune, keep=RandomSkip(cfg.share, cfg.seed))


METHOD = TrainingMethod("random_skip", "a random share of samples skipped (control)", section="random_skip",
                        schema=RandomSkipConfig, reads=("random_skip",), training=training)
