"""MemControl (Dutt et al., WACV 2025): fine-tune only the PEFT parameters of the mask the `memcontrol` search chose."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from lethe.declarations import Section, TrainingMethod
from lethe.errors import LetheError
from lethe.paths import CHOSEN_MASK


class MemControlConfig(Section):
    """An Optuna search over which transformer blocks' PEFT parameters to fine-tune."""

    family: Literal["lora", "attention", "difffit", "svdiff"] = "lora"  # what a 1-bit block trains (docs/methods.md: MemControl)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0.0)
    lr_min: float = Field(1e-5, gt=0.0, le=1.0)  # learning rate, log-uniform (published: 1e-5 to 1e-3)
    lr_max: float = Field(1e-3, gt=0.0, le=1.0)
    n_trials: int = Field(12, ge=1)  # completed trials the study needs; more resumes the same study
    population_size: int = Field(4, ge=2)  # NSGA-II's generation size
    trial_steps: int = Field(100, ge=1)  # inner-loop budget: steps of finetune.batch_size per trial
    memorization: Literal["max", "mean"] = "max"  # over the memorization subset's images
    magnitude_draws: int = Field(8, ge=1)  # random timesteps per memorized image
    fd_prompts: int = Field(100, ge=2)  # holdout prompts generated (one seed each) for the FD objective
    sample_steps: int = Field(20, ge=1, le=1000)  # DDIM steps of those generations
    fd_reference: Literal["auto", "full", "best"] = "auto"  # policy: FD of full fine-tuning, the best trial's, or auto:
    # full fine-tuning's when some trial comes within fd_tolerance of it, else the best trial's
    fd_tolerance: float = Field(0.1, ge=0.0)  # policy: relative FD rise allowed over the reference
    accuracy_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # policy: prompt accuracy drop allowed below full fine-tuning's
    max_trainable_share: float = Field(1.0, gt=0.0, le=1.0)  # policy: masks training more are not chosen
    storage: str | None = None  # an RDB URL shared by machines; default: a journal file under search/studies
    workers: int = Field(1, ge=1)  # processes sharing the study on this machine (`--workers` overrides)
    seed: int = 0

    @model_validator(mode="after")
    def _lr_range(self):
        if self.lr_min > self.lr_max:
            raise ValueError(f"memcontrol.lr_min ({self.lr_min}) is above memcontrol.lr_max ({self.lr_max})")
        return self


def training(params, model, scheduler, samples: int):
    """The mask and learning rate the `memcontrol` search chose, with the `finetune` budget of every method."""
    from lethe.training.peft_masks import Mask, MaskedTraining, transformer_blocks

    if not CHOSEN_MASK.exists():
        raise LetheError(f"{CHOSEN_MASK}: no chosen mask; run `lethe memcontrol` (or `dvc repro memcontrol`) first")
    chosen = json.loads(CHOSEN_MASK.read_text())
    unknown = set(chosen["blocks"]) - set(transformer_blocks(model.unet))
    if unknown:
        raise LetheError(f"{CHOSEN_MASK}: blocks {sorted(unknown)} are not in this model's U-Net; re-run memcontrol")
    mask = Mask(chosen["family"], tuple(chosen["blocks"]), chosen["lora_rank"], chosen["lora_alpha"])
    return MaskedTraining(model, scheduler, params.finetune.model_copy(update={"lr": chosen["lr"]}), mask)


METHOD = TrainingMethod("memcontrol", "only the PEFT parameters of the searched mask", section="memcontrol",
                        schema=MemControlConfig, reads=("memcontrol",), needs=(str(CHOSEN_MASK),), training=training)
