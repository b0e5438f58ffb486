"""LoyalDiffusion's RAU-Net and its timestep router (Li et al., arXiv 2412.01118).

RAU-Net is the U-Net with an *information transfer block* on chosen skip connections: each skip
tensor passes through its block before the decoder concatenates it, so the decoder can no longer
copy fine detail straight from the encoder. The blocks are submodules of diffusers' up blocks
(`up_blocks.<level>.skip_transfer`), applied by a forward pre-hook to the skips the up block
receives as `res_hidden_states_tuple`, so diffusers' model code is used as is. Registered there, they
are trained, saved and loaded like every other weight, and survive a deepcopy.

The router sends timesteps t >= tau to the RAU-Net and t < tau to the standard U-Net, splitting a
mixed batch; both start from the same pretrained weights.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

BLOCKS = ("conv", "conv_silu", "conv_stack", "pool", "drop", "none")  # none: the control, skips pass unchanged


class TransferBlock(nn.Module):
    """Maps a skip tensor to one of the same shape."""

    def __init__(self, kind: str, channels: int, init: str = "random"):
        super().__init__()
        self.kind = kind
        convs = {"conv": 1, "conv_silu": 1, "conv_stack": 2}.get(kind, 0)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(convs))
        if init == "identity":
            for conv in self.convs:
                nn.init.dirac_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":  # LoyalDiffusion's timestep split alone, without blocks: a control
            return skip
        if self.kind == "drop":
            return torch.zeros_like(skip)
        if self.kind == "pool":  # keep the strongest activation of each 2x2 patch, in place
            pooled, where = F.max_pool2d(skip, 2, return_indices=True, ceil_mode=True)
            return F.max_unpool2d(pooled, where, 2, output_size=skip.shape[-2:])
        for conv in self.convs:
            skip = conv(skip)
            if self.kind != "conv":
                skip = F.silu(skip)
        return skip


def skip_channels(unet: UNet2DConditionModel) -> list[list[int]]:
    """Channels of the skip tensors each up block receives, deepest up block first, in tuple order."""
    produced = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        produced += [r.out_channels for r in block.resnets]
        produced += [d.out_channels for d in (block.downsamplers or [])]
    consumed = []
    for block in unet.up_blocks:
        n = len(block.resnets)
        consumed.append(produced[-n:])
        produced = produced[:-n]
    return consumed


def _transfer_skips(up_block, args, kwargs):
    skips = kwargs["res_hidden_states_tuple"]
    kwargs["res_hidden_states_tuple"] = tuple(b(s) for b, s in zip(up_block.skip_transfer, skips))
    return args, kwargs


class WrappedUNet(nn.Module):
    """Looks like the diffusers U-Net it wraps to code that reads `.config` and `.device`."""

    inner: str  # the attribute holding that U-Net

    @property
    def config(self):
        return getattr(self, self.inner).config

    @property
    def device(self) -> torch.device:
        return getattr(self, self.inner).device


class RAUNet(WrappedUNet):
    """A U-Net whose chosen skips, (up-block level, index in the tuple it receives) with 0 the deepest level,
    pass through transfer blocks; the other skips of the same up block pass unchanged."""

    inner = "unet"

    def __init__(self, unet: UNet2DConditionModel, block: str, skips, init: str = "random"):
        super().__init__()
        self.unet = unet
        channels = skip_channels(unet)
        skips = {tuple(s) for s in skips}
        bad = [s for s in sorted(skips) if not (0 <= s[0] < len(channels) and 0 <= s[1] < len(channels[s[0]]))]
        if bad:
            raise ValueError(f"skip {list(bad[0])} does not exist (the U-Net's levels receive {[len(c) for c in channels]} skips)")
        for level in sorted({level for level, _ in skips}):
            up = unet.up_blocks[level]
            up.skip_transfer = nn.ModuleList(TransferBlock(block, c, init) if (level, i) in skips else nn.Identity()
                                             for i, c in enumerate(channels[level]))
            up.register_forward_pre_hook(_transfer_skips, with_kwargs=True)

    @property
    def blocks(self) -> dict[str, nn.ModuleList]:
        return {str(i): up.skip_transfer for i, up in enumerate(self.unet.up_blocks) if hasattr(up, "skip_transfer")}

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


class TimestepRouter(WrappedUNet):
    """t >= tau to `high` (the RAU-Net), t < tau to `low` (the standard U-Net)."""

    inner = "low"

    def __init__(self, low: nn.Module, high: nn.Module, tau: int):
        super().__init__()
        self.low, self.high, self.tau = low, high, tau

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        t = torch.as_tensor(timestep, device=sample.device).expand(len(sample))
        high = t >= self.tau
        if high.all() or not high.any():  # sampling: one t for the whole batch
            net = self.high if high.all() else self.low
            return net(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)
        out = torch.empty_like(sample)
        for net, rows in ((self.high, high), (self.low, ~high)):
            out[rows] = net(sample[rows], t[rows], encoder_hidden_states=encoder_hidden_states[rows], **kwargs).sample
        return SimpleNamespace(sample=out)


def level_skips(unet: UNet2DConditionModel, levels) -> list[tuple[int, int]]:
    """Every skip the given up-block levels receive, as (level, index)."""
    channels = skip_channels(unet)
    return [(level, i) for level in levels if 0 <= level < len(channels) for i in range(len(channels[level]))] + \
        [(level, 0) for level in levels if not 0 <= level < len(channels)]  # a bad level: RAUNet names it


def with_raunet(unet: UNet2DConditionModel, block: str, skips, tau: int, init: str) -> nn.Module:
    """The denoiser for LoyalDiffusion: RAU-Net alone when tau is 0, else routed with a copy of the U-Net."""
    if tau == 0:
        return RAUNet(unet, block, skips, init)
    return TimestepRouter(unet, RAUNet(copy.deepcopy(unet), block, skips, init), tau)
