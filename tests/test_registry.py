import subprocess
import sys

import mlflow
import pytest

from lethe.config import RegistryConfig
from lethe.registry import FD, RATE, ACCURACY, choose_champion, verdict

CFG = RegistryConfig(fd_tolerance=0.1, accuracy_tolerance=0.05)
BASE = {RATE: 0.8, FD: 10.0, ACCURACY: 0.9}


def paired(rate, fd=(0.0, -0.05, 0.05), accuracy=(0.0, -0.02, 0.02), point=0.1, fd_point=10.0):
    """A variant's metrics as evaluate writes them: paired change against the baseline, (point, low, high)."""
    m = {RATE: point, FD: fd_point, ACCURACY: 0.9}
    for name, (value, low, high) in (("vs_baseline/replication_rate_dup/diff", rate), ("vs_baseline/quality_fd_holdout", fd),
                                     ("vs_baseline/quality_prompt_accuracy_holdout/diff", accuracy)):
        m |= {name: value, f"{name}/ci_low": low, f"{name}/ci_high": high}
    return m


def test_policy_needs_a_significant_reduction_and_no_significant_quality_loss():
    assert verdict(paired((-0.5, -0.7, -0.3)), CFG)[0]
    ok, why = verdict(paired((-0.2, -0.45, 0.02)), CFG)  # the interval reaches 0: inside the noise
    assert not ok and "not a significant reduction (its interval reaches 0)" in why
    ok, why = verdict(paired((0.05, 0.012, 0.1)), CFG)  # more copies, significantly: memattn_filter in stop 25
    assert not ok and "not a significant reduction (a significant increase)" in why
    ok, why = verdict(paired((-0.5, -0.7, -0.3), fd=(0.3, 0.15, 0.45)), CFG)  # FD surely > +10%
    assert not ok and "FD +30% [+15%, +45%]" in why
    # FD's point is beyond the tolerance but its interval reaches below it: not significantly beyond
    assert verdict(paired((-0.5, -0.7, -0.3), fd=(0.15, 0.02, 0.3)), CFG)[0]
    ok, why = verdict(paired((-0.5, -0.7, -0.3), accuracy=(-0.2, -0.3, -0.1)), CFG)
    assert not ok and "prompt accuracy" in why


def test_champion_is_lowest_rate_among_the_qualified_with_every_reason_kept():
    metrics = {
        "baseline": BASE,
        "good": paired((-0.5, -0.7, -0.3), point=0.3),
        "better_but_blurry": paired((-0.8, -0.9, -0.7), fd=(1.0, 0.8, 1.2), point=0.0),
        "noise": paired((-0.1, -0.3, 0.1), point=0.05),
    }
    champion, reasons = choose_champion(metrics, "baseline", CFG)
    assert champion == "good"
    assert reasons["good"].startswith("qualifies") and reasons["noise"].startswith("refused")
    assert reasons["better_but_blurry"].startswith("refused: FD") and set(reasons) == set(metrics)
    assert choose_champion({"baseline": BASE}, "baseline", CFG)[0] == "baseline"
    assert choose_champion({"baseline": BASE, "noise": metrics["noise"]}, "baseline", CFG)[0] == "baseline"


def test_a_tie_in_replication_goes_to_the_lower_fd():
    metrics = {"baseline": BASE, "first": paired((-0.7, -0.8, -0.6), point=0.0625, fd_point=10.5),
               "sharper": paired((-0.7, -0.8, -0.6), point=0.0625, fd_point=8.0)}
    assert choose_champion(metrics, "baseline", CFG)[0] == "sharper"  # was the first listed


@pytest.fixture
def registry(project):
    """A real SQLite registry with a baseline version and a worse-quality candidate."""
    from lethe.tracking import connect
    from lethe.config import TrackingConfig

    connect(TrackingConfig(experiment="lethe-smoke"))
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    for metrics in (BASE, paired((-0.7, -0.8, -0.6), fd=(0.5, 0.3, 0.7), fd_point=15.0)):
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
    assert "fails the champion policy: FD +50% [+30%, +70%]" in refused.stderr
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.get_model_version_by_alias("m", "champion")
    forced = promote(project, "2", "--alias", "champion", "--force")
    assert forced.returncode == 0, forced.stderr
    assert str(registry.get_model_version_by_alias("m", "champion").version) == "2"


def test_promote_unknown_version(project, registry):
    result = promote(project, "9", "--alias", "champion")
    assert result.returncode == 2 and "has no version 9" in result.stderr
