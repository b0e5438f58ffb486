"""The control for every skipping method: drop a share of the samples at random, whatever they are.

A skipping mitigation (anti-gradient control, Wen's filter, MemAttn's filter) trains on fewer
per-sample gradients than plain fine-tuning. This method drops the same share blindly, so that beside
it a mitigation shows what its choice of *which* samples to drop buys over "trained on fewer samples".
With `follows`, it drops at each step the share the followed method skipped at that step (its
`models/<method>/skipped_per_step.json`, which `dvc.yaml` makes a dependency); without, `share` at
every step. Each step drops round(share × batch) samples, drawn from (seed, step), so a resumed run
drops exactly the samples an uninterrupted one would, and every rank of a DDP run agrees on the global batch.

`random_skip` follows the method `random_skip.follows` names (Wen's filter by default) with plain
fine-tuning; `random_skip_<method>` is the control of one method (`lethe.training.random_skip.control`).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from lethe.declarations import Section, TrainingMethod
from lethe.training.random_skip import RandomSkip, curve_file, followed_curve, plain_fine_tuning


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


def training(params, model, scheduler, samples: int):
    cfg = params.random_skip
    shares = followed_curve(cfg.follows) if cfg.follows else cfg.share
    return plain_fine_tuning(params, model, scheduler, samples, RandomSkip(shares, cfg.seed))


METHOD = TrainingMethod("random_skip", "a random share of samples skipped (control)", section="random_skip",
                        schema=RandomSkipConfig, reads=("random_skip",), training=training,
                        inputs=lambda params: (str(curve_file(params.random_skip.follows)),)
                        if params.random_skip.follows else (),
                        controls=lambda params: params.random_skip.follows)

