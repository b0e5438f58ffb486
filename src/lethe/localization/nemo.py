"""NeMo: localize the memorization neurons of a prompt (Hintersdorf et al., NeurIPS 2024).

Neurons are the output channels of the value projections (`to_v`) of the cross-attention layers in
the down and mid blocks. For a memorized prompt:

1. Score: the highest SSIM between the first-step noise differences of the model with the candidate
   neurons deactivated and of the intact model, over pairs of different seeds (`memorization_score`).
   It is below τ_mem (mean + one std of the intact score over holdout prompts) once memorization is gone.
2. Initial selection: deactivate every neuron whose activation z-score (against holdout prompts)
   exceeds θ in absolute value, plus the top-k of each layer; start at θ = 5, k = 0 and, while the
   score stays above τ_mem, lower θ by 0.25 (not below 1) and raise k by 1.
3. Refinement: re-activate whole layers, then single neurons, keeping each re-activation that leaves
   the score below τ_mem.

Candidate sets are scored `batch_size` at a time in one forward pass (a per-row mask on the `to_v`
outputs). The greedy order is kept exactly: after an accepted candidate, the rest of its batch was
scored against a stale set and is scored again, so any batch size returns what one-at-a-time does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lethe.memorization.attention import attention_control, cross_attention_layers
from lethe.memorization.detectors import max_cross_seed_ssim, nemo_scores, noise_differences

Neuron = tuple[str, int]  # (layer name, output channel of its to_v)


def value_layers(unet) -> dict[str, torch.nn.Module]:
    """NeMo's layers: cross-attention in the down and mid blocks, in forward order."""
    return {name: m for name, m in cross_attention_layers(unet).items() if "down_blocks" in name or "mid_block" in name}


@torch.no_grad()
def value_activations(model, states: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, P x channels: the mean absolute `to_v` output over tokens (independent of the image and t)."""
    return {name: layer.to_v(states).abs().mean(1) for name, layer in value_layers(model.unet).items()}


@dataclass
class ActivationStats:
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @classmethod
    def of(cls, activations: dict[str, torch.Tensor]) -> "ActivationStats":
        return cls({k: a.mean(0) for k, a in activations.items()}, {k: a.std(0).clamp_min(1e-8) for k, a in activations.items()})

    def z(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (a - self.mean[k]) / self.std[k] for k, a in activations.items()}


class MemorizationScore:
    """Scores neuron sets for one prompt: max SSIM between blocked and intact noise differences, seeds i ≠ j."""

    def __init__(self, model, t, x_T: torch.Tensor, states: torch.Tensor):
        self.model, self.t, self.x_T = model, t, x_T  # x_T: seeds x C x H x W; states: 1 x L x D
        self.states = states
        self.layers = list(value_layers(model.unet))
        self.channels = {name: layer.to_v.out_features for name, layer in value_layers(model.unet).items()}
        self.control = attention_control(model)
        self.intact = noise_differences(model.unet, t, x_T, states.expand(len(x_T), -1, -1))[None]
        self.calls = 0  # forward passes, for the benchmark

    def __call__(self, candidates: list[frozenset[Neuron]]) -> list[float]:
        s = len(self.x_T)
        masks = {name: torch.ones(len(candidates) * s, c, device=self.x_T.device) for name, c in self.channels.items()}
        for row, neurons in enumerate(candidates):
            for layer, channel in neurons:
                masks[layer][row * s : (row + 1) * s, channel] = 0.0
        x = self.x_T.repeat(len(candidates), 1, 1, 1)
        with self.control.masking_values(masks):
            blocked = noise_differences(self.model.unet, self.t, x, self.states.expand(len(x), -1, -1))
        self.calls += 1
        blocked = blocked.view(len(candidates), s, *blocked.shape[1:])
        return max_cross_seed_ssim(blocked, self.intact.expand_as(blocked)).tolist()


def first_passing(candidates: list[frozenset[Neuron]], score: Callable, tau: float, batch_size: int) -> int | None:
    """Index of the first candidate whose score is below tau, scoring batch_size at a time."""
    for start in range(0, len(candidates), batch_size):
        for offset, value in enumerate(score(candidates[start : start + batch_size])):
            if value < tau:
                return start + offset
    return None


def initial_candidates(z: dict[str, torch.Tensor], iterations: int, theta: float = 5.0, theta_step: float = 0.25,
                       theta_min: float = 1.0) -> list[frozenset[Neuron]]:
    """The sets NeMo's initial selection tries in turn: |z| > θ plus the top-k of each layer."""
    out = []
    for i in range(iterations):
        threshold, k = max(theta - i * theta_step, theta_min), i
        chosen = set()
        for layer, values in z.items():  # values: channels, for this prompt
            magnitude = values.abs()
            chosen |= {(layer, int(c)) for c in torch.nonzero(magnitude > threshold).flatten()}
            chosen |= {(layer, int(c)) for c in magnitude.topk(min(k, len(magnitude))).indices}
        out.append(frozenset(chosen))
    return out


def reactivate(current: frozenset[Neuron], groups: list[frozenset[Neuron]], score: Callable, tau: float,
               batch_size: int) -> frozenset[Neuron]:
    """Greedy, in order: re-activate each group whose re-activation keeps the score below tau."""
    i = 0
    while i < len(groups):
        chunk = [current - g for g in groups[i : i + batch_size]]
        found = first_passing(chunk, score, tau, batch_size)
        if found is None:
            i += len(chunk)
        else:
            current, i = chunk[found], i + found + 1
    return current


def refine(selected: frozenset[Neuron], layers: list[str], score: Callable, tau: float, batch_size: int) -> frozenset[Neuron]:
    by_layer = [frozenset(n for n in selected if n[0] == layer) for layer in layers]
    current = reactivate(selected, [g for g in by_layer if g], score, tau, batch_size)
    singles = [frozenset([n]) for n in sorted(current, key=lambda n: (layers.index(n[0]), n[1]))]
    return reactivate(current, singles, score, tau, batch_size)


def localize(score: MemorizationScore, z: dict[str, torch.Tensor], tau: float, iterations: int,
             batch_size: int) -> frozenset[Neuron] | None:
    """The refined neuron set of one prompt, or None when no initial set brings its score below tau."""
    candidates = initial_candidates(z, iterations)
    found = first_passing(candidates, score, tau, batch_size)
    if found is None:
        return None
    return refine(candidates[found], score.layers, score, tau, batch_size)


@torch.no_grad()
def deactivate(model, neurons: set[Neuron]) -> None:
    """Zero the rows of W_V (and its bias) for the neurons: the same as masking those outputs at every step."""
    layers = value_layers(model.unet)
    for layer, channel in neurons:
        layers[layer].to_v.weight[channel] = 0.0
        if layers[layer].to_v.bias is not None:
            layers[layer].to_v.bias[channel] = 0.0


def encode(model, records) -> torch.Tensor:
    return model.encode_text(model.text_encoder.tokenize([r.caption for r in records]))


@torch.no_grad()
def calibrate(model, data, t, noise: torch.Tensor, holdout_prompts: int):
    """Holdout activation statistics and τ_mem (mean + one std of their scores); target prompts above τ_mem, highest first."""
    holdout = encode(model, data.pictures("holdout")[:holdout_prompts])
    stats = ActivationStats.of(value_activations(model, holdout))
    holdout_scores = nemo_scores(model.unet, t, noise, holdout)
    tau = (holdout_scores.mean() + holdout_scores.std()).item()
    target = data.pictures("target")
    target_scores = nemo_scores(model.unet, t, noise, encode(model, target))
    memorized = [int(i) for i in target_scores.argsort(descending=True) if target_scores[i] > tau]
    return stats, tau, target, memorized, target_scores
