"""Shared fixtures: the smoke preset's params and a temporary project directory to run stages in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Two xdist workers share the 2 cores: one thread each, in this process and in every process it starts
# (dvc's stages, DDP ranks, mlflow server). Two-thread OpenMP pools spinning beside a busy worker
# made the end-to-end repro twice as slow (1048 s instead of 471 s). Alone, both cores.
UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if UNDER_XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# The `lethe` commands tests start run cold, as by default: no warm server (lethe.warm) is left behind in a
# temporary project. tests/test_warm.py and the end-to-end repro turn it on where they test it.
os.environ["LETHE_WARM"] = "0"

import torch  # noqa: E402  (after the thread settings above)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "smoke" / "params.yaml"

torch.set_num_threads(1 if UNDER_XDIST else 2)


def pytest_collection_modifyitems(items):
    """The end-to-end file first, so xdist (loadfile, no reorder) starts it at once on one worker
    while the other takes the rest; last, it would make the whole run that much longer."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture
def smoke_params():
    from lethe.config import load_params

    return load_params(SMOKE)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with the smoke params and its own MLflow store."""
    shutil.copy(SMOKE, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tiny_data(smoke_params):
    from lethe.data.sources import prepare

    return prepare(smoke_params.data)


@pytest.fixture
def tiny_model(smoke_params, tiny_data):
    from lethe.models.diffusion_model import build_model
    from lethe.models.text import corpus_vocabulary

    torch.manual_seed(0)
    return build_model(smoke_params.model, 16, 1, corpus_vocabulary([r.caption for r in tiny_data.records]))
