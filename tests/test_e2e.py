"""The whole pipeline through real DVC on the smoke preset, in a copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT, SMOKE

pytestmark = pytest.mark.e2e


def sh(*args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository holding the project's tracked files, with the smoke preset as params.yaml."""
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    shutil.copy(SMOKE, repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"]):
        sh(*command, cwd=repo, env=env)
    return repo, env


@pytest.fixture(scope="module")
def reproduced(repo):
    repo, env = repo
    return sh("dvc", "repro", cwd=repo, env=env)


def test_repro_runs_every_stage_and_writes_outputs(repo, reproduced):
    repo, _ = repo
    for stage in ("prepare", "pretrain", "train@baseline"):
        assert f"Running stage '{stage}'" in reproduced
    for path in ("data/prepared/images.npy", "data/prepared/manifest.jsonl",
                 "models/pretrained/weights.safetensors", "models/pretrained/config.json",
                 "models/baseline/weights.safetensors", "models/baseline/samples.png"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "metrics/train/baseline.json").read_text())
    for group in ("dup", "unique", "holdout"):
        assert 0.0 <= metrics[f"probe/own_nn_rate/{group}"] <= 1.0
    assert metrics["cost/train_seconds"] > 0 and metrics["cost/trainable_params"] > 0
    assert not list(repo.glob(".lethe/checkpoints/*"))  # finished stages leave nothing to resume


def test_mlflow_has_one_run_per_stage(repo, reproduced):
    repo, _ = repo
    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("lethe-smoke")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pretrain", "train@baseline"}
    baseline = runs["train@baseline"]
    assert baseline.data.tags["method"] == "baseline" and len(baseline.data.tags["git_commit"]) == 40
    assert "train/loss" in baseline.data.metrics and "lr-AdamW" in baseline.data.metrics
    assert "train/device/samples_per_sec" in baseline.data.metrics
    assert len(client.get_metric_history(baseline.info.run_id, "train/loss")) >= 2
    assert "samples.png" in [a.path for a in client.list_artifacts(baseline.info.run_id)]


def test_second_repro_does_nothing(repo, reproduced):
    repo, env = repo
    out = sh("dvc", "repro", cwd=repo, env=env)
    assert "Running stage" not in out


def test_changed_training_param_reruns_only_dependents(repo, reproduced):
    repo, env = repo
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro", cwd=repo, env=env)
    out = sh("dvc", "exp", "run", "-S", "finetune.lr=0.002", cwd=repo, env=env)
    assert "Running stage 'train@baseline'" in out
    assert "Running stage 'pretrain'" not in out and "Running stage 'prepare'" not in out
