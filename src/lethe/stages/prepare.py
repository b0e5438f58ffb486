"""`lethe prepare`: the dataset, its splits and its planted duplicates, written to data/prepared."""

from __future__ import annotations

from lethe.data.sources import prepare as prepare_data
from lethe.paths import DATA


def prepare(params) -> dict:
    data = prepare_data(params.data)
    data.save(DATA)
    return {"images": len(data.records), **{s: len(data.split(s)) for s in ("pretrain", "target", "holdout")}}
