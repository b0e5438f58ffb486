"""Shared fixtures: the smoke preset's params and a temporary project directory to run stages in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "smoke" / "params.yaml"

# two xdist workers share the 2 cores: one thread each; alone, both
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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
    from lethe.models.factory import build_model
    from lethe.models.text import corpus_vocabulary

    torch.manual_seed(0)
    return build_model(smoke_params.model, 16, 1, corpus_vocabulary([r.caption for r in tiny_data.records]))
