"""The prepared dataset on disk: `images.npy` (uint8, N x C x H x W) and `manifest.jsonl`.

Each image is stored once. The manifest gives its id (its row in images.npy), split, caption, label
(the digit, or null for a user's folder), `group` (the id of the first copy of the same picture: copies
found by `lethe.data.duplicates` share it, and always share a split), `repeats` (the planting factor:
how many times this row is repeated in training, 1 unless planted) and `dup_count`: how many times the
picture is trained on, its copies in the split times the planting factor, and `part`: `tune` for the
pictures every choice made from outputs reads (the tune split, never trained on, and `data.tune_dup` planted
target pictures), `judge` for the rest, which evaluate, detect and the audits judge. The two never meet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lethe.errors import LetheError
from lethe.files import atomic_dir

SPLITS = ("pretrain", "target", "holdout", "tune")
TUNE, JUDGE = "tune", "judge"


@dataclass
class Record:
    id: int
    split: str
    caption: str
    dup_count: int
    label: int | None
    source: str
    group: int
    repeats: int = 1
    part: str = JUDGE  # tune: read by the choices stages make from outputs; judge: by evaluate, detect, audit


@dataclass
class PreparedData:
    images: np.ndarray  # uint8, N x C x H x W
    records: list[Record]

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def training_records(self, name: str) -> list[Record]:
        """The split as a training set sees it: every file, each planted one repeated `repeats` times."""
        records = self.split(name)
        if not records:
            raise LetheError(f"split '{name}' is empty: adjust data.target_size / data.holdout_size")
        return [r for r in records for _ in range(r.repeats)]

    def pictures(self, name: str) -> list[Record]:
        """One record per picture of the split: the first copy of each duplicate group."""
        seen: set[int] = set()
        return [r for r in self.split(name) if not (r.group in seen or seen.add(r.group))]

    def prompt_groups(self, per_group: int) -> dict[str, list[Record]]:
        """Prompts to test, one per picture: dup (pictures trained on more than once: planted or natural
        copies), unique (pictures trained on once) and holdout (never trained on). The dup group is empty
        on a folder without copies."""
        target = [r for r in self.pictures("target") if r.part == JUDGE]
        return {
            "dup": [r for r in target if r.dup_count > 1][:per_group],
            "unique": [r for r in target if r.dup_count == 1][:per_group],
            "holdout": self.pictures("holdout")[:per_group],
        }

    def tune_groups(self, per_group: int) -> dict[str, list[Record]]:
        """The tune part, shaped like `prompt_groups`: dup (planted target pictures set aside for tuning) and
        holdout (the tune split, never trained on). Disjoint from every picture `prompt_groups` returns."""
        return {"dup": [r for r in self.pictures("target") if r.part == TUNE][:per_group],
                "holdout": self.pictures("tune")[:per_group]}

    def require_tune(self, stage: str) -> dict[str, list[Record]]:
        """The whole tune part, or a one-line error naming the params key when it is empty."""
        groups = self.tune_groups(len(self.records))
        if not groups["holdout"]:
            raise LetheError(f"params.yaml: 'data.tune_size' is 0, but {stage} chooses from outputs and reads only the "
                             "tune part: set data.tune_size (pictures never trained on, never judged)")
        return groups

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
        try:
            records = [Record(**json.loads(line)) for line in (path / "manifest.jsonl").read_text().splitlines()]
        except TypeError:
            raise LetheError(f"{path / 'manifest.jsonl'}: written by an older lethe; run `dvc repro prepare` again")
        images = np.load(path / "images.npy", mmap_mode="r", allow_pickle=False)
        return cls(images=images, records=records)


def tune_record(groups: dict[str, list[Record]], *seed_lists) -> dict:
    """What a tuning stage read, for its reports folder: each group's picture ids and captions, and its
    generation seeds (tests check them against what evaluate judged)."""
    return {"pictures": {name: [r.id for r in records] for name, records in groups.items()},
            "captions": {name: [r.caption for r in records] for name, records in groups.items()},
            "seeds": sorted({int(s) for seeds in seed_lists for s in seeds})}


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0)  # a copy: memory-mapped rows are read-only


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats to uint8, the storage and PNG format."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()


def assign_splits(
    groups: np.ndarray, target_size: int, holdout_size: int, dup_share: float, dup_factor: int, seed: int,
    tune_size: int = 0, tune_dup: int = 0,
) -> tuple[list[str], list[int], list[int], list[str]]:
    """Shuffle pictures (duplicate groups, each one unit) into target, holdout, tune and pretrain (the rest),
    and plant `dup_share` of the target pictures `dup_factor` times, the last `tune_dup` of them set aside for
    tuning. Returns each row's split, dup_count (copies of its picture in the split times its planting
    factor), repeats (the planting factor) and part (tune or judge)."""
    pictures = np.unique(groups)
    if target_size + holdout_size + tune_size > len(pictures):
        raise LetheError(
            f"params.yaml: 'data.target_size' + 'data.holdout_size' + 'data.tune_size' = "
            f"{target_size + holdout_size + tune_size} but the dataset has only {len(pictures)} distinct pictures "
            f"({len(groups)} images)"
        )
    n_planted = round(dup_share * target_size)
    if tune_dup and tune_dup >= n_planted:
        raise LetheError(f"params.yaml: 'data.tune_dup' = {tune_dup} leaves no planted picture to judge "
                         f"({n_planted} planted: data.dup_share x data.target_size)")
    order = np.random.default_rng(seed).permutation(pictures)
    split_of = {int(g): "pretrain" for g in pictures}
    split_of |= {int(g): "target" for g in order[:target_size]}
    split_of |= {int(g): "holdout" for g in order[target_size : target_size + holdout_size]}
    split_of |= {int(g): TUNE for g in order[target_size + holdout_size : target_size + holdout_size + tune_size]}
    planted = {int(g) for g in order[:n_planted]}  # target pictures in random order
    tuned = {int(g) for g in order[n_planted - tune_dup : n_planted]} if tune_dup else set()
    copies = dict(zip(*np.unique(groups, return_counts=True)))
    splits = [split_of[int(g)] for g in groups]
    repeats = [dup_factor if int(g) in planted else 1 for g in groups]
    dup_counts = [int(copies[g]) * r for g, r in zip(groups, repeats)]
    parts = [TUNE if split_of[int(g)] == TUNE or int(g) in tuned else JUDGE for g in groups]
    return splits, dup_counts, repeats, parts
