import subprocess
import sys

import mlflow
import pytest

from lethe.config import RegistryConfig
from lethe.registry import FD, RATE, ACCURACY, choose_champion, policy_failure

CFG = RegistryConfig(fd_tolerance=0.1, accuracy_tolerance=0.05)
BASE = {RATE: 0.8, FD: 10.0, ACCURACY: 0.9}


def test_policy_tolerances():
    assert policy_failure({RATE: 0.1, FD: 10.9, ACCURACY: 0.86}, BASE, CFG) is None
    assert "FD" in policy_failure({RATE: 0.1, FD: 11.5, ACCURACY: 0.9}, BASE, CFG)
    assert "prompt accuracy" in policy_failure({RATE: 0.1, FD: 10.0, ACCURACY: 0.8}, BASE, CFG)


def test_champion_is_lowest_rate_within_tolerance():
    metrics = {
        "baseline": BASE,
        "good": {RATE: 0.3, FD: 10.5, ACCURACY: 0.9},
        "better_but_blurry": {RATE: 0.0, FD: 20.0, ACCURACY: 0.9},
    }
    assert choose_champion(metrics, "baseline", CFG) == "good"
    assert choose_champion({"baseline": BASE}, "baseline", CFG) == "baseline"


def test_a_tie_in_replication_goes_to_the_lower_fd():
    metrics = {"baseline": BASE, "first": {RATE: 0.0625, FD: 10.5, ACCURACY: 0.9},
               "sharper": {RATE: 0.0625, FD: 8.0, ACCURACY: 0.9}}
    assert choose_champion(metrics, "baseline", CFG) == "sharper"  # was the first listed


@pytest.fixture
def registry(project):
    """A real SQLite registry with a baseline version and a worse-quality candidate."""
    from lethe.tracking import connect
    from lethe.config import TrackingConfig

    connect(TrackingConfig(experiment="lethe-smoke"))
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    for metrics in (BASE, {RATE: 0.1, FD: 15.0, ACCURACY: 0.9}):
        version = client.create_model_version("m", source=str(project))
        for key, value in metrics.items():
            client.set_model_version_tag("m", version.version, f"metric/{key}", str(value))
    client.set_registered_model_alias("m", "baseline", "1")
    return client


def promote(project, *args):
    return subprocess.run([sys.executable, "-m", "lethe.cli", "promote", "m", *args], cwd=project,
                          capture_output=True, text=True)


def test_promote_refuses_a_version_that_fails_the_policy(project, registry):
    refused = promote(project, "2", "--alias", "champion")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "fails the champion policy: FD 15.000" in refused.stderr
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.get_model_version_by_alias("m", "champion")
    forced = promote(project, "2", "--alias", "champion", "--force")
    assert forced.returncode == 0, forced.stderr
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "2"


def test_promote_unknown_version(project, registry):
    result = promote(project, "9", "--alias", "champion")
    assert result.returncode == 2 and "has no version 9" in result.stderr
