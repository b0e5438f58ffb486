"""Pictures that appear more than once in a dataset: exact copies after resizing, and near copies.

Web-scraped and user folders hold the same picture as several files (re-encoded, re-named, captioned
differently). Such copies are the main cause of memorization, and a copy in the holdout split would make
a "never trained on" prompt a trained one. So copies form one group, and a group is the unit that
`assign_splits` places: every copy of a picture lands in one split.

Near copies are joined when a picture's distance to another is below `max_distance` in the chosen feature
space: for pixels, the root-mean-square difference on [0, 1] intensities at `data.resolution` or, above
32 px, averaged down to 32 px (so one threshold serves every resolution: a JPEG re-encode or a half-size
copy of a photo moves it by at most 0.008 at 64 px but 0.066 at 512 px, measured on scikit-learn's
sample photos); for learned features (SSCD, open_clip), 1 - cosine similarity.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lethe.memorization.neighbors import nearest_neighbors

NEIGHBORS = 16  # candidates per picture; larger groups still join through union-find chains
PIXEL_SIZE = 32  # pixels are compared at most this size


def duplicate_groups(images: np.ndarray, features: torch.Tensor | None, max_distance: float) -> np.ndarray:
    """One group id per row (the smallest row id in its group): exact copies, then near copies."""
    parent = np.arange(len(images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first_seen: dict[str, int] = {}
    for i, image in enumerate(images):
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        join(first_seen.setdefault(key, i), i)

    if max_distance > 0 and len(images) > 1:
        for i, (distances, indices) in enumerate(zip(*near_neighbors(images, features))):
            for d, j in zip(distances.tolist(), indices.tolist()):
                if j != i and d <= max_distance:
                    join(i, j)
    return np.array([root(i) for i in range(len(images))])


def near_neighbors(images: np.ndarray, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (as `duplicate_groups` defines them) and indices of each picture's nearest others."""
    k = min(NEIGHBORS + 1, len(images))
    if features is None:  # pixels: RMS difference on [0, 1]
        x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)
        if x.shape[-1] > PIXEL_SIZE:
            x = torch.nn.functional.adaptive_avg_pool2d(x, PIXEL_SIZE)
        x = x.flatten(1)
        d, i = nearest_neighbors(x, x, k=k)
        return d / x.shape[1] ** 0.5, i
    d, i = nearest_neighbors(features, features, k=k, unit=True)
    return d**2 / 2, i  # on unit vectors 1 - cos = d^2 / 2


def duplicate_summary(groups: np.ndarray, splits: list[str], dup_counts: list[int], repeats: list[int]) -> dict[str, float]:
    """`metrics/data.json`: how many pictures have copies, the largest group, and the share of target
    training samples that show a picture seen more than once (natural copies and planted ones)."""
    ids, sizes = np.unique(groups, return_counts=True)
    in_target = [i for i, s in enumerate(splits) if s == "target"]
    samples = sum(repeats[i] for i in in_target)
    duplicated = sum(repeats[i] for i in in_target if dup_counts[i] > 1)
    return {
        "data/images": float(len(groups)),
        "data/pictures": float(len(ids)),
        "data/duplicate_groups": float((sizes > 1).sum()),
        "data/duplicate_files": float(sizes[sizes > 1].sum()),
        "data/largest_group": float(sizes.max()),
        "data/target_duplicate_sample_share": duplicated / samples if samples else 0.0,
        "data/planted_pairs": float(len({groups[i] for i in in_target if repeats[i] > 1})),
        "data/dup_prompts": float(len({groups[i] for i in in_target if dup_counts[i] > 1})),
    }
