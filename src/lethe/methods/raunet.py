"""LoyalDiffusion's ablation: RAU-Net at every timestep (tau = 0), with loyal's blocks on loyal's skips."""

from lethe.declarations import TrainingMethod
from lethe.methods.loyal import measured_choice, with_raunet
from lethe.paths import LOYAL_CHOICE

METHOD = TrainingMethod("raunet", "RAU-Net at every t", reads=("loyal",), needs=(str(LOYAL_CHOICE),), inputs=measured_choice,
                        prepare_model=lambda params, model: with_raunet(params, model, every_t=True))
