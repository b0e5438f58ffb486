"""Cross-attention capture and control through diffusers attention processors (MemAttn, NeMo).

Every cross-attention layer of the U-Net gets a `CrossAttentionProcessor`; all of a model's share one
`AttentionControl`, which says what to record and what to change. diffusers' model code runs as is.

- With nothing asked of it, a processor runs PyTorch's fused attention, as diffusers' own does.
- With `capture` on, it computes the probabilities explicitly (the key side is a few dozen tokens, so
  this is cheap) and keeps their mean over heads and query pixels: one distribution over token
  positions per sample and layer (MemAttn's `a`).
- On the rows marked conditional it applies MemAttn's mitigation: tokens outside `keep_tokens` (the
  padding after the first end token) are masked, and the beginning token's logit is multiplied by C.
- `value_masks[layer]` multiplies the `to_v` output channels (NeMo's neurons) per row, so many
  candidate neuron sets can be tried in one forward pass; a 0 deactivates a neuron.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from lethe.models.diffusion_model import in_forward_order


class AttentionControl:
    def __init__(self, layers: list[str]):
        self.layers = layers  # cross-attention module names, in the U-Net's forward order
        self.capture = False
        self.captured: dict[str, torch.Tensor] = {}  # layer -> B x L, from the last forward pass
        self.conditional: torch.Tensor | None = None  # B, which rows the steering applies to
        self.keep_tokens: torch.Tensor | None = None  # B x L, False = masked (conditional rows only)
        self.begin_scale = 1.0  # MemAttn's C on the beginning token's logit (conditional rows only)
        self.value_masks: dict[str, torch.Tensor] = {}  # layer -> B x C (or C) multiplier on to_v outputs

    @property
    def steering(self) -> bool:
        return self.conditional is not None and (self.begin_scale != 1.0 or self.keep_tokens is not None)

    @contextlib.contextmanager
    def steer(self, conditional: torch.Tensor, keep_tokens: torch.Tensor | None, begin_scale: float):
        """Apply MemAttn's masking and scaling to the conditional rows of the passes inside the block."""
        saved = self.conditional, self.keep_tokens, self.begin_scale
        self.conditional, self.keep_tokens, self.begin_scale = conditional, keep_tokens, begin_scale
        try:
            yield self
        finally:
            self.conditional, self.keep_tokens, self.begin_scale = saved

    @contextlib.contextmanager
    def capturing(self):
        saved, self.capture = self.capture, True
        try:
            yield self
        finally:
            self.capture = saved
            self.captured = {}

    @contextlib.contextmanager
    def masking_values(self, masks: dict[str, torch.Tensor]):
        saved, self.value_masks = self.value_masks, masks
        try:
            yield self
        finally:
            self.value_masks = saved


class CrossAttentionProcessor:
    def __init__(self, control: AttentionControl, name: str):
        self.control, self.name = control, name

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        c = self.control
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, queries, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        mask = c.value_masks.get(self.name)
        if mask is not None:
            v = v * (mask[:, None, :] if mask.dim() == 2 else mask).to(v.dtype)
        q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        if c.capture or c.steering:
            out = self._explicit(attn, q, k, v, attention_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, queries, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _explicit(self, attn, q, k, v, attention_mask):
        c = self.control
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # B x heads x queries x tokens
        if c.steering:
            rows = c.conditional.to(logits.device)
            if c.begin_scale != 1.0:
                scale = torch.ones(logits.shape[0], logits.shape[-1], device=logits.device, dtype=logits.dtype)
                scale[rows, 0] = c.begin_scale
                logits = logits * scale[:, None, None, :]
            if c.keep_tokens is not None:
                masked = ~c.keep_tokens.to(logits.device) & rows[:, None]
                logits = logits.masked_fill(masked[:, None, None, :], float("-inf"))
        if attention_mask is not None:
            logits = logits + attention_mask
        probs = logits.softmax(-1)
        if c.capture:
            c.captured[self.name] = probs.detach().float().mean((1, 2))
        return probs @ v


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """The U-Net's cross-attention modules by name, in forward order (what a layer index counts)."""
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    return {name: modules[name] for name in in_forward_order(list(modules))}


def attention_control(model) -> AttentionControl:
    """The model's AttentionControl, installing the processors on first use (or after the U-Net changed)."""
    layers = cross_attention_layers(model.unet)
    control = getattr(model, "_attention_control", None)
    if control is None or control.layers != list(layers) or any(
        getattr(m.processor, "control", None) is not control for m in layers.values()
    ):
        control = AttentionControl(list(layers))
        for name, module in layers.items():
            module.set_processor(CrossAttentionProcessor(control, name))
        object.__setattr__(model, "_attention_control", control)  # a plain attribute, not a submodule
    return control


def entropy(distribution: torch.Tensor) -> torch.Tensor:
    """-Σ a_i ln a_i over the last dimension (0 ln 0 = 0)."""
    p = distribution.float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1)
