import mlflow

from lethe.config import TrackingConfig
from lethe.errors import LetheError
from lethe.tracking import connect, stage_run, tracking_uri


def test_uri_is_absolute_under_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir("/")
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"


def test_params_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5999")) == "http://127.0.0.1:5999"
    assert tracking_uri(TrackingConfig()) == "sqlite:////elsewhere.db"


def test_stage_run_logs_tags_params_and_artifacts_location(project, smoke_params):
    with stage_run(smoke_params, stage="train", method="baseline", sections=("finetune",), data_hash="abc") as run:
        mlflow.log_metric("x", 1.0)
    client = mlflow.MlflowClient()
    logged = client.get_run(run.info.run_id)
    assert logged.data.tags["stage"] == "train" and logged.data.tags["method"] == "baseline"
    assert logged.data.tags["data_hash"] == "abc" and "git_commit" in logged.data.tags
    assert logged.data.params["finetune.lr"] == str(smoke_params.finetune.lr)
    assert logged.info.run_name == "train@baseline"
    assert logged.info.artifact_uri.startswith((project / "mlruns" / "artifacts").as_uri())
    assert (project / "mlruns" / "mlflow.db").exists()


def test_unreachable_server_fails_fast(project):
    import time

    started = time.perf_counter()
    try:
        connect(TrackingConfig(uri="http://127.0.0.1:9"))
    except LetheError as exc:
        assert "cannot be reached" in str(exc)
    else:
        raise AssertionError("connect() accepted an unreachable server")
    assert time.perf_counter() - started < 30
