"""How a method declares itself, once: its name, its params section, every section it reads, its hooks.

Everything else derives from the declarations in `lethe.methods`: the params schema (`config.Params`),
the CLI's choices, the training and mitigate stages, the sampler, the tests' method lists, and the
check of `dvc.yaml` (`tests/test_pipeline_deps.py`). This module is light on purpose (pydantic and
the standard library): a hook imports its algorithm when it is called, so reading the declarations
never pulls in torch or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """One params section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TrainingMethod:
    """A `train@<name>` stage: the pretrained model fine-tuned on the target split through these hooks.

    - `prepare_model(params, model)`: change the model before training (LoyalDiffusion's RAU-Net);
    - `caption_noise(params, captions)`: a function that rewrites a caption each time it is drawn;
    - `training(params, model, scheduler, samples)`: the LightningModule (default: plain fine-tuning);
    - `controls(params)`: for a control or an ablation, the method it is compared with in the report;
    - `seed_offset`: a replicate of the baseline at another training seed (its A/A rows).
    """

    name: str
    summary: str
    section: str | None = None  # the params section this method owns ...
    schema: type[Section] | None = None  # ... and its schema
    reads: tuple[str, ...] = ()  # every params section the hooks read, its own included
    needs: tuple[str, ...] = ()  # inputs beyond the data and the pretrained model (paths)
    # files read at run time, params permitting (default: `needs`): their contents key a resumable run
    inputs: Callable[[Any], tuple[str, ...]] | None = None
    prepare_model: Callable[[Any, Any], None] | None = None
    caption_noise: Callable[[Any, list[str]], Callable[[str], str] | None] | None = None
    training: Callable[[Any, Any, Any, int], Any] | None = None
    controls: Callable[[Any], str | None] | None = None
    seed_offset: int = 0  # trains at finetune.seed + this: the baseline's A/A replicates


@dataclass(frozen=True)
class InferenceMitigation:
    """The baseline with a mitigation packaged in its config (`spec.inference[name]`), or pruned weights.

    `acts` says where it works: `embedding`, on the text embedding before the sampling loop
    (`on_embedding(unet, t, x_t, cond, empty, settings) -> cond`); `attention`, in cross-attention at
    every step (`in_attention(control, ids, end_id, settings) -> context manager`); `weights`, on the
    weights themselves (no sampling hook). `stage` builds the variant; `settings(params)` is what a
    `mitigate` stage packages.
    """

    name: str
    summary: str
    acts: Literal["embedding", "attention", "weights"]
    stage: Literal["mitigate", "localize"]
    section: str | None = None
    schema: type[Section] | None = None
    reads: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    settings: Callable[[Any], dict] | None = None
    on_embedding: Callable[..., Any] | None = None
    in_attention: Callable[..., Any] | None = None
