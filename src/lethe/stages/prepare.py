"""`lethe prepare`: the dataset, its duplicate groups, splits and planted duplicates, written to
data/prepared; what duplicates it holds to `metrics/data.json` and MLflow."""

from __future__ import annotations

import mlflow
import numpy as np

from lethe.data.duplicates import duplicate_summary
from lethe.data.sources import prepare as prepare_data
from lethe.files import content_hash, write_json
from lethe.paths import DATA, DATA_METRICS
from lethe.tracking import stage_run


def prepare(params) -> dict:
    data = prepare_data(params.data)
    rs = data.records
    summary = {**duplicate_summary(np.array([r.group for r in rs]), [r.split for r in rs],
                                   [r.dup_count for r in rs], [r.repeats for r in rs]),
               **{f"data/{s}_images": float(len(data.split(s))) for s in ("pretrain", "target", "holdout", "tune")}}
    tune, judged = data.tune_groups(len(rs)), data.prompt_groups(len(rs))
    # the part every choice made from outputs reads, and what is judged: never the same pictures
    summary |= {"data/tune_pictures": float(len(tune["holdout"])), "data/tune_dup_pictures": float(len(tune["dup"])),
                "data/judged_dup_prompts": float(len(judged["dup"]))}
    data.save(DATA)
    with stage_run(params, stage="prepare", method="prepare", sections=("data",), data_hash=content_hash(DATA)):
        mlflow.log_metrics(summary)
    write_json(DATA_METRICS, summary)
    return summary
