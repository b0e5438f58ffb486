"""Tensors computed once per content and kept under `.lethe/` (outside DVC's outputs), named by a hash of
everything they depend on, so a changed input never reuses a stale file and every stage on the same
inputs shares one computation: the VAE latents of the prepared images (`data.latents`), the replication
features of the training set (`evaluation.metrics.TrainingSet`). Delete `.lethe/` to reclaim the space."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def cached_tensor(file: Path, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor stored in `file`, or `compute()`'s result, stored there first."""
    if file.exists():
        return load_file(file)["tensor"]
    tensor = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")  # several processes may compute at once: last rename wins
    save_file({"tensor": tensor.contiguous()}, tmp)
    tmp.replace(file)
    return tensor
