"""LoyalDiffusion's ablation: RAU-Net at every timestep (tau = 0), with loyal's blocks and levels."""

from lethe.declarations import TrainingMethod
from lethe.methods.loyal import with_raunet

METHOD = TrainingMethod("raunet", "RAU-Net at every t", reads=("loyal",),
                        prepare_model=lambda params, model: with_raunet(params, model, tau=0))
