"""Exact nearest-neighbour search in chunks, so the reference set can outgrow one distance matrix."""

from __future__ import annotations

import torch


def nearest_neighbors(
    queries: torch.Tensor, references: torch.Tensor, k: int = 2, chunk_size: int = 65536, unit: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distances and indices of the k nearest references of each query, nearest first.

    References are visited `chunk_size` rows at a time and a running top-k is kept, so memory grows
    with queries x chunk_size, not queries x references. With `unit`, queries and references are scaled
    to unit length first (then the L2-nearest is the cosine-nearest).
    """
    queries = _rows(queries, unit)
    k = min(k, len(references))
    best_d = torch.full((len(queries), 0), float("inf"))
    best_i = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(references), chunk_size):
        chunk = _rows(torch.as_tensor(references[start : start + chunk_size]), unit)
        d = torch.cdist(queries, chunk)
        d, i = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_d, order = torch.cat([best_d, d], 1).sort(dim=1, stable=True)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
        best_d, best_i = best_d[:, :k], best_i[:, :k]
    return best_d, best_i


def _rows(x: torch.Tensor, unit: bool) -> torch.Tensor:
    x = x.flatten(1).float()
    return torch.nn.functional.normalize(x, dim=1) if unit else x
