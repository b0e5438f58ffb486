"""`lethe memcontrol`: run the study with one or more workers, choose a mask, write and log the result.

`lethe memcontrol --workers N` starts N-1 helper processes (`lethe memcontrol --join`) on the same
storage; `--join` alone adds a worker from anywhere that reaches the storage (an RDB URL across
machines). Every process logs its trials as nested runs under the study's one `memcontrol` run, found
by its study tag, so a resumed study keeps adding to the same parent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from lethe.config import Params  # noqa: E402
from lethe.data.prepared import tune_record  # noqa: E402
from lethe.evaluation.metrics import TUNE_SEEDS, generation_plan  # noqa: E402
from lethe.files import atomic_dir, content_hash, write_json  # noqa: E402
from lethe.paths import CHOSEN_MASK, DATA, PLOTS, REPORTS, SEARCH_METRICS  # noqa: E402
from lethe.progress import CORES_FILE  # noqa: E402
from lethe.search.memcontrol import (  # noqa: E402
    checkpoint_root, choose, completed, describe, load_inputs, open_study, reference, subset_name, work,
)
from lethe.tracking import connect, stage_run, tracking_uri  # noqa: E402

STUDY_TAG = "memcontrol_study"
REPORT, PLOT = REPORTS / "memcontrol", PLOTS / "memcontrol.json"


def _parent(params: Params, study_name: str) -> str | None:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.{STUDY_TAG} = '{study_name}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _connect(params: Params) -> None:
    """Workers started together on a fresh SQLite store would race to create its tables: one at a time."""
    uri = tracking_uri(params.tracking)
    if not uri.startswith("sqlite:///"):
        connect(params.tracking)
        return
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        connect(params.tracking)


def _join(params: Params, inputs, study) -> dict:
    """A helper worker: trials only, under the study's parent run (created here if it does not exist yet)."""
    parent = _parent(params, inputs.study_name)
    if parent is None:
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        parent = client.create_run(experiment.experiment_id, run_name="memcontrol", tags={
            STUDY_TAG: inputs.study_name, "stage": "memcontrol", "method": "memcontrol"}).info.run_id
    return {"study": inputs.study_name, "trials_run": work(inputs, study, parent)}


def memcontrol(params: Params, params_path: str = "params.yaml", workers: int | None = None, join: bool = False) -> dict:
    workers = workers or params.memcontrol.workers
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))  # the workers share this process's cores
    if workers > 1:  # and keep that split: `lethe repro`'s share of the cores is for a single process
        os.environ.pop(CORES_FILE, None)
    _connect(params)
    inputs = load_inputs(params)
    study = open_study(inputs, worker=-1 if join else 0)
    if join:
        return _join(params, inputs, study)
    existing = _parent(params, inputs.study_name)
    opened = (mlflow.start_run(run_id=existing) if existing else
              stage_run(params, stage="memcontrol", method="memcontrol", sections=("finetune", "sample", "memcontrol"),
                        data_hash=content_hash(DATA)))
    with opened as run:
        mlflow.set_tag(STUDY_TAG, inputs.study_name)
        helpers = [subprocess.Popen([sys.executable, "-m", "lethe.cli", "--params", params_path, "memcontrol",
                                     "--join", "--workers", str(workers)]) for _ in range(workers - 1)]
        try:
            full = reference(inputs, study, run.info.run_id) if params.memcontrol.fd_reference != "best" else None
            ran = work(inputs, study, run.info.run_id)
        finally:
            codes = [helper.wait() for helper in helpers]
        if any(codes):
            raise RuntimeError(f"a memcontrol worker failed (exit codes {codes}); re-run to resume the study")
        scored = inputs.tune[: params.memcontrol.fd_prompts]  # what objectives() generated for
        read = tune_record({"dup": inputs.memorized, "holdout": scored},
                           generation_plan([r.caption for r in scored], 1, TUNE_SEEDS)[1])
        summary = write_outputs(params, study, full, subset_name(inputs.memorized), read)
        summary |= {"memcontrol/trials_run_here": float(ran)}
        shutil.rmtree(checkpoint_root(inputs), ignore_errors=True)  # nothing left to resume
        mlflow.log_metrics(summary)
        mlflow.log_artifacts(str(REPORT), "memcontrol")
    return summary


def write_outputs(params: Params, study: optuna.Study, full: dict | None, subset: str, read: dict | None = None) -> dict[str, float]:
    """The chosen mask (train@memcontrol's input), the Pareto front (plot, DVC plot), summary metrics and
    `read`, the tune part's pictures and seeds the study scored (reports/memcontrol/prompts.json)."""
    cfg = params.memcontrol
    trials = completed(study)
    chosen, reason = choose(trials, full, cfg)
    front = {t.number for t in study.best_trials}
    rows = [describe(t) | {"pareto": t.number in front, "chosen": t.number == chosen.number} for t in trials]
    write_json(CHOSEN_MASK, describe(chosen) | {
        "study": study.study_name, "family": cfg.family, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "policy": reason, "reference": full, "pareto_front": [r for r in rows if r["pareto"]],
        "memorization_subset": subset})
    write_json(PLOT, rows)
    with atomic_dir(REPORT) as tmp:
        pareto_png(study, chosen, full, tmp / "pareto.png")
        write_json(tmp / "trials.json", rows)
        if read is not None:
            write_json(tmp / "prompts.json", read)
    metrics = {"memcontrol/trials": float(len(trials)), "memcontrol/pareto_size": float(len(front)),
               **{f"memcontrol/chosen/{k}": float(v) for k, v in describe(chosen).items()
                  if k not in ("blocks", "trial") and v is not None}}
    if full:
        metrics |= {f"memcontrol/full/{k}": float(v) for k, v in full.items() if "/" not in k}
    write_json(SEARCH_METRICS, metrics)
    return metrics


def pareto_png(study: optuna.Study, chosen, full: dict | None, path: Path) -> None:
    """Optuna's Pareto-front plot, with the chosen trial and full fine-tuning marked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = optuna.visualization.matplotlib.plot_pareto_front(
            study, target_names=["memorization (Wen's magnitude)", "FD, tune prompts"])
    ax.scatter([chosen.values[0]], [chosen.values[1]], marker="*", s=200, c="gold", edgecolors="k", label="chosen", zorder=5)
    if full:
        ax.scatter([full["memorization"]], [full["fd"]], marker="X", s=120, c="red", label="full fine-tuning", zorder=5)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
