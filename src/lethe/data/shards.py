"""IET-AGC's shard assignment: each training sample (duplicates expanded) to one of K shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lethe.errors import LetheError
from lethe.files import write_json


def assign_shards(samples: int, shards: int, seed: int) -> np.ndarray:
    """A random balanced assignment: shard sizes differ by at most one."""
    if samples < shards:
        raise LetheError(f"ietagc.shards: {shards} shards but only {samples} training samples")
    order = np.random.default_rng(seed).permutation(samples)
    assignment = np.empty(samples, dtype=np.int64)
    assignment[order] = np.arange(samples) % shards
    return assignment


def save_shards(path: Path, assignment: np.ndarray) -> None:
    write_json(path, {"shards": int(assignment.max()) + 1, "assignment": assignment.tolist()})


def load_shards(path: Path, samples: int) -> np.ndarray:
    if not path.exists():
        raise LetheError(f"{path}: no shard assignment; run `dvc repro shard` first")
    assignment = np.asarray(json.loads(path.read_text())["assignment"], dtype=np.int64)
    if len(assignment) != samples:
        raise LetheError(f"{path}: assigns {len(assignment)} samples but the training split has {samples}; re-run shard")
    return assignment
