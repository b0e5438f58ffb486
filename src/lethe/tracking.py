"""MLflow conventions: where the store is, one run per stage, the tags every run carries.

The default store is SQLite at `<project>/mlruns/mlflow.db` with artifacts in `<project>/mlruns/artifacts`
(MLflow 3 refuses the plain file store). The project root is `DVC_ROOT` when DVC runs the stage, so
`dvc exp run` in a temporary copy still logs to the project's own store.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from lethe.config import Params, TrackingConfig
from lethe.errors import LetheError


# when this stage's command started (`lethe.cli.main` sets it: in the warm server's child, at the fork); each
# stage run logs `cost/stage_seconds` from it to the run's end, which the report's provenance lists
STARTED = time.time()
STAGE_SECONDS = "cost/stage_seconds"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = project_root() / "mlruns"
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


@contextlib.contextmanager
def _no_retries():
    """MLflow retries an unreachable server for minutes; the start-up check should fail in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# the kind tag makes MLflow 3's UI open the experiment on its training runs, not on the (empty here)
# GenAI overview it shows an untagged experiment
EXPERIMENT_KIND = "mlflow.experimentKind"
KIND = {EXPERIMENT_KIND: "custom_model_development"}


def connect(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and create the experiment; fail now if a server cannot be reached."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    try:
        with _no_retries():
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                mlflow.create_experiment(cfg.experiment, artifact_location=_artifact_location(uri), tags=KIND)
            elif EXPERIMENT_KIND not in experiment.tags:  # created by an older lethe
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, KIND[EXPERIMENT_KIND])
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise LetheError(f"MLflow store {uri} cannot be reached ({type(exc).__name__}); check tracking.uri or MLFLOW_TRACKING_URI")
    mlflow.set_experiment(cfg.experiment)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else key, sub).items()}
    return {prefix: str(value)}


@contextlib.contextmanager
def stage_run(params: Params, *, stage: str, method: str, sections: tuple[str, ...], data_hash: str):
    """An MLflow run for one stage and variant, with its params and the standard tags."""
    import mlflow

    connect(params.tracking)
    dumped = params.model_dump(mode="json")
    with mlflow.start_run(run_name=f"{stage}" if stage == method else f"{stage}@{method}") as run:
        mlflow.set_tags({"stage": stage, "method": method, "git_commit": git_commit(), "data_hash": data_hash})
        mlflow.log_params({k: v for s in sections for k, v in flatten(s, dumped[s]).items()})
        yield run
        mlflow.log_metric(STAGE_SECONDS, time.time() - STARTED)


def lightning_logger(run, cfg: TrackingConfig):
    """Lightning's MLflow logger attached to an already-open run (it would otherwise open its own)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=tracking_uri(cfg), run_id=run.info.run_id)
