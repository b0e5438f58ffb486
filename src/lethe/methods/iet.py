"""The ablation of IET-AGC: its proxies, shards and averaging with anti-gradient control switched off.

Beside `ietagc` it shows which part of IET-AGC's reduction the sharded training and averaging buy and
which part the skipping does.
"""

from __future__ import annotations

from lethe.declarations import TrainingMethod
from lethe.methods.ietagc import proxy_ensemble
from lethe.paths import SHARDS

METHOD = TrainingMethod(
    "iet", "IET-AGC without anti-gradient control (ablation)", reads=("ietagc",), needs=(str(SHARDS),),
    training=lambda params, model, scheduler, samples: proxy_ensemble(params, model, scheduler, samples, agc=False),
    controls=lambda params: "ietagc",
)
