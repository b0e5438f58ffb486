"""Every method lethe runs, registered once; each module declares its params, what it reads and its hooks.

Adding a method: its module here, one line below, its section in params.yaml, and its entries in
dvc.yaml (`tests/test_pipeline_deps.py` says which ones are missing).
"""

from __future__ import annotations

from lethe.declarations import InferenceMitigation, TrainingMethod
from lethe.errors import LetheError
from lethe.methods import (
    baseline, baseline_seed1, baseline_seed2, baseline_seed3, iet, ietagc, ietagc_plus, loyal, memattn, memattn_filter, memcontrol, nemo, random_caption, random_skip,
    random_skip_ietagc, random_skip_ietagc_plus, random_skip_memattn_filter, raunet, wen_filter, wen_inference,
)

# fine-tuning methods, each a `train@<name>` stage
TRAINING: dict[str, TrainingMethod] = {m.name: m for m in (
    baseline.METHOD,
    loyal.METHOD,
    raunet.METHOD,
    ietagc.METHOD,
    ietagc_plus.METHOD,
    iet.METHOD,
    wen_filter.METHOD,
    random_caption.METHOD,
    memattn_filter.METHOD,
    memcontrol.METHOD,
    random_skip.METHOD,
    random_skip_ietagc.METHOD,
    random_skip_ietagc_plus.METHOD,
    random_skip_memattn_filter.METHOD,
    baseline_seed1.METHOD,
    baseline_seed2.METHOD,
    baseline_seed3.METHOD,
)}

# the baseline with an inference-time mitigation: `mitigate@<name>`, or `localize` for NeMo's pruning
INFERENCE: dict[str, InferenceMitigation] = {m.name: m for m in (
    memattn.METHOD,
    wen_inference.METHOD,
    nemo.METHOD,
)}

METHODS = tuple(TRAINING)
VARIANTS = METHODS + tuple(INFERENCE)  # what evaluate, report and register take
REPLICATES = tuple(name for name, m in TRAINING.items() if m.seed_offset)  # the baseline's A/A replicates
CANDIDATES = tuple(v for v in VARIANTS if v not in REPLICATES)  # what the registry may promote
MITIGATE = tuple(name for name, m in INFERENCE.items() if m.stage == "mitigate")


def training_method(name: str) -> TrainingMethod:
    if name not in TRAINING:
        raise LetheError(f"unknown training method '{name}' (known: {', '.join(METHODS)})")
    return TRAINING[name]


def inference_mitigation(name: str) -> InferenceMitigation:
    if name not in INFERENCE:
        raise LetheError(f"unknown inference-time mitigation '{name}' (known: {', '.join(INFERENCE)})")
    return INFERENCE[name]


def sections():
    """Every method's own params section and its schema, in registration order."""
    declared = [*TRAINING.values(), *INFERENCE.values()]
    return {m.section: m.schema for m in declared if m.section is not None}
