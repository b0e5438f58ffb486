"""Where a report's figures come from: the commit, a hash of the params, the machine, and each stage's
time as its MLflow run recorded it (`cost/stage_seconds`: from the stage's command to its run's end)."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from lethe.tracking import STAGE_SECONDS, git_commit


def params_hash(path: str | Path = "params.yaml") -> str:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "none"


def machine() -> str:
    """The host, its CPU and core count, and its accelerator where torch sees one."""
    import torch

    cpu = platform.processor() or platform.machine()
    model = _cpu_model()
    gpu = f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.node()}: {model or cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def stage_times(experiment: str) -> list[tuple[str, float, str, float]]:
    """(stage run name, seconds, commit, end as a Unix time) of the latest run of each stage in the experiment,
    in the order they ran; nested runs (Optuna's trials) are left out, as are runs that logged no time."""
    import mlflow

    found = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["attributes.start_time DESC"])
    latest: dict[str, object] = {}
    for run in found:
        if "mlflow.parentRunId" in run.data.tags or STAGE_SECONDS not in run.data.metrics:
            continue
        latest.setdefault(run.info.run_name, run)
    ordered = sorted(latest.values(), key=lambda r: r.info.start_time)
    return [(r.info.run_name, r.data.metrics[STAGE_SECONDS], r.data.tags.get("git_commit", "unknown")[:10],
             (r.info.end_time or r.info.start_time) / 1000) for r in ordered]


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: the wall time with at least one stage running. A
    span from the first start to the last end would count the days between a run and a partial re-run."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def provenance_section(experiment: str, params_path: str | Path = "params.yaml") -> str:
    """Markdown: the run's provenance and a table of stage times (their sum is the pipeline's compute time;
    stages that ran side by side overlap in wall time)."""
    commit = git_commit()
    times = stage_times(experiment)
    lines = ["", "## Provenance", "",
             f"Commit `{commit[:10]}`; params.yaml sha256 `{params_hash(params_path)}`; machine: {machine()}.", ""]
    if not times:
        return "\n".join(lines + ["No stage has logged its time to MLflow yet.", ""])
    total = sum(seconds for _, seconds, _, _ in times)
    wall = busy_seconds([(end - seconds, end) for _, seconds, _, end in times])
    other = sorted({c for _, _, c, _ in times if c != commit[:10]})
    lines += [f"Each stage's latest run in MLflow, from its command's start to its run's end: {total:,.0f} s in all "
              f"({total / 60:.1f} min); {wall:,.0f} s ({wall / 60:.1f} min) of wall time with a stage running "
              f"(stages side by side count once){'; some ran at other commits: ' + ', '.join(other) if other else ''}.",
              "", "| stage | seconds | commit |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:,.1f} | {c} |" for name, seconds, c, _ in times]
    return "\n".join(lines) + "\n"
