"""`lethe shard`: each training sample of the target split (duplicates expanded) assigned to one of IET-AGC's shards."""

from __future__ import annotations

from lethe.data.prepared import PreparedData
from lethe.data.shards import assign_shards, save_shards
from lethe.paths import DATA, SHARDS


def shard(params) -> dict:
    samples = len(PreparedData.load(DATA).training_records("target"))
    save_shards(SHARDS, assign_shards(samples, params.ietagc.shards, params.ietagc.seed))
    return {"samples": samples, "shards": params.ietagc.shards}
