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
