import pytest

from lethe.evaluation.report import markdown_table, with_baseline_changes


def test_each_variant_is_shown_beside_the_baseline():
    metrics = with_baseline_changes({
        "baseline": {"replication/rate/dup": 0.4, "quality/fd/holdout": 20.0},
        "loyal": {"replication/rate/dup": 0.1, "quality/fd/holdout": 21.0},
    })
    assert metrics["loyal"]["vs_baseline/replication_rate_dup"] == pytest.approx(-0.75)
    assert metrics["loyal"]["vs_baseline/fd_holdout"] == pytest.approx(0.05)
    table = markdown_table(metrics)
    assert "| loyal | –" not in table and "-75%" in table and "+5%" in table


@pytest.mark.parametrize("stage", ["report", "register"])
def test_a_variant_without_metrics_is_one_line_and_exit_2(project, capsys, stage):
    from lethe.cli import main

    (project / "metrics").mkdir()
    (project / "metrics/baseline.json").write_text('{"replication/rate/dup": 0.4, "quality/fd/holdout": 20.0}')
    assert main([stage]) == 2  # the smoke preset lists 12 variants; only the baseline was evaluated
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics/loyal.json" in err and "evaluate@loyal" in err
    assert not (project / "reports").exists()  # nothing half-written
