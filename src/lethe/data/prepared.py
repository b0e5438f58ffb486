"""The prepared dataset on disk: `images.npy` (uint8, N x C x H x W) and `manifest.jsonl`.

Each image is stored once. The manifest gives its id (its row in images.npy), split, caption, label
(the digit, or null for a user's folder) and `dup_count`: how many times the pair appears in training.
Planted duplicates are expanded when a split is read for training, as LAION's copies would be.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lethe.errors import LetheError
from lethe.files import atomic_dir

SPLITS = ("pretrain", "target", "holdout")


@dataclass
class Record:
    id: int
    split: str
    caption: str
    dup_count: int
    label: int | None
    source: str


@dataclass
class PreparedData:
    images: np.ndarray  # uint8, N x C x H x W
    records: list[Record]

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def training_records(self, name: str) -> list[Record]:
        """The split as a training set sees it: each record repeated `dup_count` times."""
        records = self.split(name)
        if not records:
            raise LetheError(f"split '{name}' is empty: adjust data.target_size / data.holdout_size")
        return [r for r in records for _ in range(r.dup_count)]

    def prompt_groups(self, per_group: int) -> dict[str, list[Record]]:
        """Prompts to test: dup (planted duplicates), unique (other target images), holdout (never trained on)."""
        target = self.split("target")
        return {
            "dup": [r for r in target if r.dup_count > 1][:per_group],
            "unique": [r for r in target if r.dup_count == 1][:per_group],
            "holdout": self.split("holdout")[:per_group],
        }

    def tensor(self, ids) -> torch.Tensor:
        """Images for these ids as float in [-1, 1]."""
        return to_float(self.images[np.asarray(ids)])

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            np.save(tmp / "images.npy", self.images)
            with open(tmp / "manifest.jsonl", "w") as handle:
                for r in self.records:
                    handle.write(json.dumps(r.__dict__) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        path = Path(path)
        if not (path / "manifest.jsonl").exists():
            raise LetheError(f"{path}: no prepared data here; run `dvc repro prepare` first")
        records = [Record(**json.loads(line)) for line in (path / "manifest.jsonl").read_text().splitlines()]
        images = np.load(path / "images.npy", mmap_mode="r", allow_pickle=False)
        return cls(images=images, records=records)


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0)  # a copy: memory-mapped rows are read-only


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats to uint8, the storage and PNG format."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()


def assign_splits(
    n: int, target_size: int, holdout_size: int, dup_share: float, dup_factor: int, seed: int
) -> tuple[list[str], list[int]]:
    """Shuffle ids into target, holdout and pretrain (the rest); plant duplicates in target."""
    if target_size + holdout_size > n:
        raise LetheError(
            f"params.yaml: 'data.target_size' + 'data.holdout_size' = {target_size + holdout_size} "
            f"but the dataset has only {n} images"
        )
    order = np.random.default_rng(seed).permutation(n)
    split = ["pretrain"] * n
    dup_count = [1] * n
    for i in order[:target_size]:
        split[i] = "target"
    for i in order[target_size : target_size + holdout_size]:
        split[i] = "holdout"
    n_planted = round(dup_share * target_size)
    for i in order[:n_planted]:  # target ids are already in random order
        dup_count[i] = dup_factor
    return split, dup_count
