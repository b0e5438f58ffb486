"""Wen et al.'s inference-time mitigation: optimise the prompt embedding before sampling.

At the first sampling step, a memorized prompt's conditional noise prediction sits far from the
unconditional one. Gradient steps on the text embedding (AdamW, lr 0.05, at most 10) shrink that
text-conditional noise magnitude; the beginning token's gradient is zeroed so it stays put, and a
prompt stops moving once its magnitude is below the target. Sampling then uses the new embedding.
"""

from __future__ import annotations

import torch

from lethe.diffusion import noise_magnitude


def optimise_prompt_embedding(unet, t, x_t: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor, *, lr: float = 0.05,
                              iterations: int = 10, target: float = 0.0) -> torch.Tensor:
    """Embeddings (B x L x D) whose first-step noise magnitude is at most `target`, or after `iterations`."""
    with torch.no_grad():
        eps_uncond = unet(x_t, t, encoder_hidden_states=empty.expand_as(cond)).sample
    embedding = cond.detach().clone().requires_grad_(True)
    # no weight decay: a prompt that reached its target must stay exactly where it is
    optimizer = torch.optim.AdamW([embedding], lr=lr, weight_decay=0.0)
    for _ in range(iterations):
        with torch.enable_grad():
            magnitude = noise_magnitude(unet(x_t, t, encoder_hidden_states=embedding).sample, eps_uncond)
            active = magnitude > target
            if not active.any():
                break
            # a sum, so that each prompt's gradient is its own magnitude's
            (grad,) = torch.autograd.grad(magnitude[active].sum(), embedding)
        grad[:, 0] = 0.0  # the beginning token
        done = embedding.detach()[~active].clone()
        embedding.grad = grad
        optimizer.step()
        with torch.no_grad():  # Adam's momentum would carry a finished prompt on: put it back
            embedding[~active] = done
    return embedding.detach()
