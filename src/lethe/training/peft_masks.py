"""PEFT masks (MemControl): which transformer blocks of the U-Net are fine-tuned, and through what.

A mask has one bit per transformer block (the `Transformer2DModel` modules under the down, mid and up
blocks' `.attentions`); a 0 freezes that block's PEFT parameters, and everything outside the PEFT
parameters of the 1-blocks stays frozen, the text encoder included. Families:

- `lora`: low-rank adapters (through `peft`) on the attention projections of the chosen blocks;
- `attention`: the attention projections themselves (self- and cross-attention);
- `difffit`: DiffFit-style scales and biases: the blocks' biases and norm parameters, plus a learned
  scale γ (initialised to 1) on each residual branch's output projection;
- `svdiff`: SVDiff's spectral shifts (Han et al., 2023): every weight matrix of the chosen blocks (linear
  layers, and 1x1 or larger convolutions reshaped to a matrix) is W = U diag(σ) Vᵀ, frozen, and trains only
  δ, one shift per singular value: W' = U diag(ReLU(σ + δ)) Vᵀ, with δ = 0 at the start.

MemControl's paper searches masks over the attention, DiffFit and SV-Diff families; `lora` is kept as an
extra family (the one most fine-tuning scripts use).

`merge` folds adapters and scales into the plain weights, so a masked model saves and loads through
`models/factory.py` exactly like a fully fine-tuned one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.nn.utils import parametrize

from lethe.models.diffusion_model import DiffusionModel, in_forward_order
from lethe.training.module import DiffusionTraining

FAMILIES = ("attention", "difffit", "svdiff", "lora")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# output projections of a transformer block's residual branches: where DiffFit's γ scales
BRANCH_OUTPUTS = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")


def transformer_blocks(unet: nn.Module) -> list[str]:
    """The U-Net's transformer blocks in order: down, mid, up (one mask bit each)."""
    return in_forward_order([n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel) and ".attentions." in n])


@dataclass(frozen=True)
class Mask:
    family: str
    blocks: tuple[str, ...]  # the blocks whose bit is 1
    lora_rank: int = 4
    lora_alpha: float = 4.0

    @classmethod
    def from_bits(cls, blocks: list[str], bits, family: str, lora_rank: int = 4, lora_alpha: float = 4.0) -> "Mask":
        """`bits[i]` is the bit of `blocks[i]` (as `transformer_blocks` lists them)."""
        if len(bits) != len(blocks):
            raise ValueError(f"{len(bits)} mask bits for {len(blocks)} transformer blocks")
        return cls(family, tuple(n for n, b in zip(blocks, bits) if b), lora_rank, lora_alpha)


class Scale(nn.Module):
    """DiffFit's γ as a parametrization: the wrapped weight (or bias) is multiplied by a learned scalar."""

    def __init__(self, gamma: nn.Parameter):
        super().__init__()
        self.gamma = gamma

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.gamma


class SpectralShift(nn.Module):
    """SVDiff's parametrization of a weight: its SVD frozen, a learned shift δ of each singular value."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = weight.shape
        u, sigma, vh = torch.linalg.svd(weight.detach().flatten(1).float(), full_matrices=False)
        # not persistent: a checkpoint keeps δ; a resumed run takes the SVD again from the same frozen weight
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("sigma", sigma, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(sigma))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # the stored weight is replaced, not used
        spectrum = torch.relu(self.sigma + self.delta)
        return ((self.u * spectrum) @ self.vh).view(self.shape).to(weight.dtype)


def _in_blocks(name: str, blocks: tuple[str, ...]) -> bool:
    return any(name.startswith(block + ".") for block in blocks)


def projections(unet: nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """The attention projection layers (q, k, v, out; self- and cross-attention) inside the blocks."""
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and _in_blocks(n, blocks)
            and any(n.endswith(f".{a}.{p}") for a in ("attn1", "attn2") for p in PROJECTIONS)]


def apply_mask(model: DiffusionModel, mask: Mask) -> None:
    """Freeze the whole model, then make the mask's PEFT parameters (and only those) trainable."""
    if mask.family not in FAMILIES:
        raise ValueError(f"unknown PEFT family {mask.family!r} (known: {', '.join(FAMILIES)})")
    model.requires_grad_(False)
    unet = model.unet
    if not mask.blocks:
        return
    if mask.family == "lora":
        from peft import LoraConfig

        # diffusers' add_adapter injects peft's LoRA layers; only their A and B matrices train
        unet.add_adapter(LoraConfig(r=mask.lora_rank, lora_alpha=mask.lora_alpha,
                                    target_modules=projections(unet, mask.blocks)))
    elif mask.family == "attention":
        for name in projections(unet, mask.blocks):
            unet.get_submodule(name).requires_grad_(True)
    elif mask.family == "svdiff":
        for name, module in list(unet.named_modules()):
            if _in_blocks(name, mask.blocks) and isinstance(module, (nn.Linear, nn.Conv2d)):
                parametrize.register_parametrization(module, "weight", SpectralShift(module.weight))
    else:
        for name, param in unet.named_parameters():
            if _in_blocks(name, mask.blocks) and name.endswith(".bias"):
                param.requires_grad_(True)
        for name, module in unet.named_modules():
            if _in_blocks(name, mask.blocks) and isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.requires_grad_(True)
            if _in_blocks(name, mask.blocks) and any(name.endswith("." + b) for b in BRANCH_OUTPUTS):
                scale = Scale(nn.Parameter(torch.ones(())))  # one γ shared by the layer's weight and bias
                parametrize.register_parametrization(module, "weight", scale)
                if module.bias is not None:
                    parametrize.register_parametrization(module, "bias", scale)


def merge(model: DiffusionModel, mask: Mask) -> None:
    """Fold LoRA adapters and DiffFit scales into the weights; the model is then a plain U-Net again."""
    unet = model.unet
    if mask.family == "lora" and mask.blocks:
        unet.fuse_lora()
        unet.unload_lora()
    if mask.family in ("difffit", "svdiff"):
        for module in list(unet.modules()):
            for tensor in ("weight", "bias"):
                if parametrize.is_parametrized(module, tensor):
                    parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    model.requires_grad_(False)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_count(model: DiffusionModel) -> int:
    """What full fine-tuning trains (U-Net and text encoder, no adapter, no VAE): the share's denominator."""
    modules = [model.unet, model.text_encoder]
    return sum(p.numel() for m in modules for n, p in m.named_parameters()
               if "lora_" not in n and not n.endswith((".gamma", ".delta")))


class MaskedTraining(DiffusionTraining):
    """Plain fine-tuning of the mask's PEFT parameters; the saved model has them merged in."""

    def __init__(self, model: DiffusionModel, noise_scheduler, cfg, mask: Mask):
        super().__init__(model, noise_scheduler, cfg.model_copy(update={"train_text_encoder": False}))
        apply_mask(model, mask)
        self.mask = mask

    def trained_model(self) -> DiffusionModel:
        merge(self.model, self.mask)
        return self.model
