"""The control of IET-AGC+'s anti-gradient control: IET-AGC+ itself (redistribution and augmentation
included), with at each step the share `ietagc_plus` skipped dropped at random instead of by the banks.
Its redistribution then moves the samples skipped most by chance."""

from __future__ import annotations

from lethe.methods.ietagc import proxy_ensemble
from lethe.paths import SHARDS
from lethe.training.random_skip import control

METHOD = control("ietagc_plus", reads=("ietagc", "ietagc_plus"), needs=(str(SHARDS),),
                 structure=lambda params, model, scheduler, samples, keep:
                 proxy_ensemble(params, model, scheduler, samples, plus=params.ietagc_plus, keep=keep))
