"""The control of IET-AGC's anti-gradient control: its proxies, shards and averaging, and at each step the
share `ietagc` skipped, dropped at random instead of by the banks."""

from __future__ import annotations

from lethe.methods.ietagc import proxy_ensemble
from lethe.paths import SHARDS
from lethe.training.random_skip import control

METHOD = control("ietagc", reads=("ietagc",), needs=(str(SHARDS),),
                 structure=lambda params, model, scheduler, samples, keep:
                 proxy_ensemble(params, model, scheduler, samples, keep=keep))
