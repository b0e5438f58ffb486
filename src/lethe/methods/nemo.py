"""NeMo (Hintersdorf et al.): the memorization neurons of memorized prompts, localized and pruned (`localize`)."""

from __future__ import annotations

from pydantic import Field

from lethe.declarations import InferenceMitigation, Section


class NemoConfig(Section):
    holdout_prompts: int = Field(50, ge=3)  # activation statistics and tau_mem come from these
    max_prompts: int = Field(20, ge=1)  # target prompts scored; those above tau_mem are localized
    seeds: int = Field(10, ge=2)
    iterations: int = Field(16, ge=1)  # initial selection: (theta, k) tries at most; 16 is the whole schedule, theta 5 -> 1.25
    batch_size: int = Field(32, ge=1)  # candidate neuron sets scored in one forward pass


METHOD = InferenceMitigation("nemo", "memorization neurons pruned", acts="weights", stage="localize", section="nemo",
                             schema=NemoConfig, reads=("nemo",))
