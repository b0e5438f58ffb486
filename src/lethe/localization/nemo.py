"""NeMo: localize the memorization neurons of a prompt (Hintersdorf et al., NeurIPS 2024).

Neurons are the output channels of the value projections (`to_v`) of the cross-attention layers in
the down and mid blocks. For a memorized prompt, as the authors' code computes it:

1. Seeds: the first-step noise differences of the intact model for S seeds. A seed is kept when its
   similarity to some other seed is above τ_mem (a memorized prompt repeats itself across seeds); a
   prompt with no kept seed is not localized.
2. Score of a neuron set: the highest similarity, over the kept seeds, between the noise difference
   with the set deactivated and the intact one *of the same seed* (`MemorizationScore`). Memorization
   is gone once it is at most τ_mem (mean + one std of the intact pairwise similarities of tune-split
   prompts).
3. Initial selection: deactivate every neuron whose activation z-score (against tune-split prompts)
   exceeds θ in absolute value, plus the k most active neurons of each layer (raw mean |to_v|);
   start at θ = 5, k = 0 and, while the score stays above τ_mem, lower θ by 0.25 and raise k by 1,
   while θ > 1: 16 sets, the last at θ = 1.25, k = 15. If none passes, the last set is refined
   against its own score (the authors' fallback), and the prompt counts as not reaching τ_mem.
4. Refinement: re-activate whole layers (from the mid block back to the first), then single neurons
   in the same layer order, keeping each re-activation that leaves the score below the threshold.

Candidate sets are scored `batch_size` at a time in one forward pass (a per-row mask on the `to_v`
outputs). The greedy order is kept exactly: after an accepted candidate, the rest of its batch was
scored against a stale set and is scored again, so any batch size returns what one-at-a-time does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lethe.memorization.attention import attention_control, cross_attention_layers
from lethe.memorization.detectors import (nemo_pairwise, nemo_scores, noise_differences, pairwise_similarities,
                                          seed_max_similarity, similarity)

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
    """Scores neuron sets for one prompt: the highest similarity, over the kept seeds, between a seed's noise
    difference with the set deactivated and its intact one."""

    def __init__(self, model, t, x_T: torch.Tensor, states: torch.Tensor, tau: float):
        self.model, self.t, self.states = model, t, states  # x_T: seeds x C x H x W; states: 1 x L x D
        self.layers = list(value_layers(model.unet))
        self.channels = {name: layer.to_v.out_features for name, layer in value_layers(model.unet).items()}
        self.control = attention_control(model)
        intact = noise_differences(model.unet, t, x_T, states.expand(len(x_T), -1, -1))
        self.kept = kept_seeds(intact, tau)
        self.x_T, self.intact = x_T[self.kept], intact[self.kept]
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
        return same_seed_score(self.intact, blocked.view(len(candidates), s, *blocked.shape[1:])).tolist()


def kept_seeds(intact: torch.Tensor, tau: float) -> torch.Tensor:
    """Indices of the seeds (of S x C x H x W intact noise differences) similar to another seed above tau."""
    return torch.nonzero(seed_max_similarity(pairwise_similarities(intact[None]), len(intact))[0] > tau).flatten()


def same_seed_score(intact: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """For K x C x H x W intact and N x K x C x H x W blocked noise differences (the same K seeds):
    per candidate, the highest similarity between a seed's blocked and intact difference."""
    n, k = blocked.shape[:2]
    return similarity(blocked.flatten(0, 1), intact.repeat(n, 1, 1, 1)).view(n, k).max(1).values


def first_passing(candidates: list[frozenset[Neuron]], score: Callable, tau: float, batch_size: int,
                  inclusive: bool = False) -> tuple[int, float] | None:
    """Index and score of the first candidate whose score is below tau (or at it, `inclusive`), scoring
    batch_size at a time."""
    for start in range(0, len(candidates), batch_size):
        for offset, value in enumerate(score(candidates[start : start + batch_size])):
            if value < tau or (inclusive and value == tau):
                return start + offset, value
    return None


def theta_schedule(iterations: int, theta: float = 5.0, theta_step: float = 0.25, theta_min: float = 1.0):
    """(θ, k) of the initial selection's tries: θ falls by theta_step while above theta_min, k rises by 1."""
    out = []
    while theta > theta_min and len(out) < iterations:
        out.append((theta, len(out)))
        theta -= theta_step
    return out


def initial_candidates(z: dict[str, torch.Tensor], activations: dict[str, torch.Tensor],
                       iterations: int) -> list[frozenset[Neuron]]:
    """The sets NeMo's initial selection tries in turn: |z| > θ plus the k most active neurons of each layer."""
    out = []
    for threshold, k in theta_schedule(iterations):
        chosen = set()
        for layer, values in z.items():  # values: channels, for this prompt
            chosen |= {(layer, int(c)) for c in torch.nonzero(values.abs() > threshold).flatten()}
            raw = activations[layer]
            chosen |= {(layer, int(c)) for c in raw.topk(min(k, len(raw))).indices}
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
            current, i = chunk[found[0]], i + found[0] + 1
    return current


def refine(selected: frozenset[Neuron], layers: list[str], score: Callable, tau: float, batch_size: int) -> frozenset[Neuron]:
    """Whole layers, then single neurons, from the last layer back to the first (the authors' order)."""
    order = list(reversed(layers))
    by_layer = [frozenset(n for n in selected if n[0] == layer) for layer in order]
    current = reactivate(selected, [g for g in by_layer if g], score, tau, batch_size)
    singles = [frozenset([n]) for n in sorted(current, key=lambda n: (order.index(n[0]), n[1]))]
    return reactivate(current, singles, score, tau, batch_size)


@dataclass
class Localized:
    neurons: frozenset[Neuron]
    reached_tau: bool  # did an initial set bring the score to τ_mem (else: the authors' fallback)


def localize(score: MemorizationScore, z: dict[str, torch.Tensor], activations: dict[str, torch.Tensor], tau: float,
             iterations: int, batch_size: int) -> Localized | None:
    """The refined neuron set of one prompt; None when no seed of it is kept (nothing memorized to localize)."""
    if len(score.kept) == 0:
        return None
    candidates = initial_candidates(z, activations, iterations)
    found = first_passing(candidates, score, tau, batch_size, inclusive=True)
    if found is None:  # keep the last set, refined against its own score
        last = candidates[-1]
        return Localized(refine(last, score.layers, score, score([last])[0], batch_size), False)
    return Localized(refine(candidates[found[0]], score.layers, score, tau, batch_size), True)


@torch.no_grad()
def deactivate(model, neurons: set[Neuron]) -> None:
    """Zero the rows of W_V (and its bias) for the neurons: the same as masking those outputs at every step."""
    layers = value_layers(model.unet)
    for layer, channel in neurons:
        layers[layer].to_v.weight[channel] = 0.0
        if layers[layer].to_v.bias is not None:
            layers[layer].to_v.bias[channel] = 0.0


def tune_prompts(data, n: int) -> list:
    """The never-trained prompts that set NeMo's statistics and τ_mem: the tune split's, never judged."""
    return data.require_tune("localize")["holdout"][:n]


def encode(model, records) -> torch.Tensor:
    return model.encode_text(model.text_encoder.tokenize([r.caption for r in records]))


@torch.no_grad()
def calibrate(model, data, t, noise: torch.Tensor, holdout_prompts: int):
    """Activation statistics and τ_mem (mean + one std of the pairwise seed similarities) of prompts never
    trained on, from the tune split (never judged); the target prompts with a kept seed (some pair above
    τ_mem), highest first."""
    holdout = encode(model, tune_prompts(data, holdout_prompts))
    stats = ActivationStats.of(value_activations(model, holdout))
    pairwise = nemo_pairwise(model.unet, t, noise, holdout)
    tau = (pairwise.mean() + pairwise.std()).item()
    target = data.pictures("target")
    target_scores = nemo_scores(model.unet, t, noise, encode(model, target))
    memorized = [int(i) for i in target_scores.argsort(descending=True) if target_scores[i] > tau]
    return stats, tau, target, memorized, target_scores
