import re

import numpy as np
import pytest

from lethe.config import Params
from lethe.evaluation.report import against_controls, controls_section, markdown_table, mechanism


def test_each_figure_shows_its_interval_and_a_significant_change_is_marked():
    base = {"replication/rate/dup": 0.4, "replication/rate/dup/ci_low": 0.3, "replication/rate/dup/ci_high": 0.5}
    loyal = {"replication/rate/dup": 0.1, "replication/rate/dup/ci_low": 0.05, "replication/rate/dup/ci_high": 0.2,
             "vs_baseline/replication_rate_dup/diff": -0.3, "vs_baseline/replication_rate_dup/diff/ci_low": -0.35,
             "vs_baseline/replication_rate_dup/diff/ci_high": -0.2, "vs_baseline/replication_rate_dup/significant": -1.0,
             "vs_baseline/quality_fd_holdout": 0.05, "vs_baseline/quality_fd_holdout/ci_low": -0.1,
             "vs_baseline/quality_fd_holdout/ci_high": 0.2, "vs_baseline/quality_fd_holdout/significant": 0.0}
    table = markdown_table({"baseline": base, "loyal": loyal})
    assert "| baseline | – | 0.400 [0.300, 0.500] | – |" in table
    assert "| loyal | – | 0.100 [0.050, 0.200] | -0.300 [-0.350, -0.200] * |" in table
    assert "+5% [-10%, +20%] |" in table  # inside the noise: no mark


def test_each_row_says_what_its_mechanism_did():
    params = Params()
    train = {"baseline": {"cost/trainable_params": 1_000_000.0, "train/skipped_share_mean": 0.0},
             "wen_filter": {"train/skipped_share_mean": 0.1234}, "random_skip": {"train/skipped_share_mean": 0.1234},
             "random_skip_ietagc": {"train/skipped_share_mean": 0.05}, "memcontrol": {"cost/trainable_params": 12_500.0}}
    controls = {"random_skip": "wen_filter", "random_skip_ietagc": "ietagc", "iet": "ietagc"}
    localized = {"nemo/union_neurons": 31.0, "nemo/localized_prompts": 5.0, "nemo/memorized_prompts": 7.0}
    mask = {"family": "attention", "blocks": ["a", "b"]}
    said = {v: mechanism(v, params, train, localized, mask, controls=controls)
            for v in ("baseline", "wen_filter", "random_skip", "random_skip_ietagc", "memcontrol", "nemo", "memattn",
                      "loyal")}
    assert said["baseline"] == "–"
    assert said["wen_filter"] == "skipped 12.3% of samples"
    assert said["random_skip"] == "skipped 12.3% of samples, at random: wen_filter's share at each step"
    assert said["random_skip_ietagc"] == "skipped 5.0% of samples, at random: ietagc's share at each step"
    assert said["memcontrol"] == "trains 1.25% of parameters, attention on 2 blocks"
    assert said["nemo"] == "31 to_v neurons pruned, from 5 of 7 prompts localized"
    assert said["memattn"] == "begin-token logit x1.25, padding masked, every step"
    assert said["loyal"] == "conv transfer blocks on every skip of levels [0, 1], t ≥ 500"  # nothing measured
    choice = {"skips": [[1, 0], [1, 1]], "skips_total": 4, "tau": 480, "tau_from": "measured"}
    assert mechanism("loyal", params, train, localized, mask, choice) == (
        "conv transfer blocks on the 2 of 4 skips least essential for FD: (1, 0), (1, 1), t ≥ 480 (measured)")
    assert mechanism("raunet", params, train, localized, mask, choice).endswith("(1, 0), (1, 1), every t")


@pytest.mark.parametrize("stage", ["report", "register"])
def test_a_variant_without_metrics_is_one_line_and_exit_2(project, capsys, stage):
    from lethe.cli import main

    (project / "metrics").mkdir()
    (project / "metrics/baseline.json").write_text('{"replication/rate/dup": 0.4, "quality/fd/holdout": 20.0}')
    assert main([stage]) == 2  # the smoke preset lists 12 variants; only the baseline was evaluated
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics/loyal.json" in err and "evaluate@loyal" in err
    assert not (project / "reports").exists()  # nothing half-written


def test_each_method_is_paired_with_its_control_on_the_same_prompts():
    """4 dup prompts x 2 generations: the method copies 1 of 8, its control 5 of 8, prompt by prompt."""
    prompts = np.repeat(["a", "b", "c", "d"], 2)

    def dup(copied):
        return {"dup": {"prompts": prompts, "copied": np.array(copied, dtype=bool), "diversity": np.zeros(4)}}

    outcomes = {"wen_filter": dup([1, 0, 0, 0, 0, 0, 0, 0]), "random_skip": dup([1, 1, 1, 1, 1, 0, 0, 0]),
                "other": {"dup": {**dup([0] * 8)["dup"], "prompts": np.repeat(["a", "b", "c", "e"], 2)}}}
    row, unpaired = against_controls([("wen_filter", "random_skip"), ("other", "random_skip")], outcomes, resamples=200)
    assert (row["method_rate"], row["control_rate"], row["diff"]) == (0.125, 0.625, -0.5)
    assert unpaired == {"method": "other", "control": "random_skip", "unpaired": True}  # other prompts: not paired
    # per prompt the differences are -0.5, -1, -0.5, 0: no draw is above 0, and only all-d draws reach it
    assert -1.0 <= row["low"] < row["high"] < 0.0 and row["significant"] == -1.0
    section = controls_section([row, unpaired])
    assert "| other | random_skip | – | – | not paired: no dup prompts in common |" in section
    assert f"| wen_filter | random_skip | 0.125 | 0.625 | -0.500 [{row['low']:+.3f}, {row['high']:+.3f}] * |" in section


def test_every_section_of_the_page_is_html_not_markdown():
    from lethe.evaluation.report import html_page

    sections = controls_section([{"method": "wen_filter", "control": "random_skip", "method_rate": 0.5,
                                  "control_rate": 0.6, "diff": -0.1, "low": -0.2, "high": 0.05, "significant": 0.0}])
    page = html_page({"baseline": {"replication/rate/dup": 0.4}}, sections + "\n## Data\n\n60 images.\n", {})
    assert "<pre>" not in page and "| method |" not in page and "|---|" not in page
    assert "<h2>Each mechanism against its control</h2>" in page and "<h2>Data</h2>" in page
    assert "<td>wen_filter</td>" in page and "<td>-0.100 [-0.200, +0.050]</td>" in page
    assert page.count("<div class='scroll'><table>") == 1 and page.count('<div class="scroll"><table>') == 1


def test_trade_off_labels_never_overlap_even_where_points_crowd():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from lethe.evaluation.report import label_points

    fig, ax = plt.subplots(figsize=(8, 6))
    points = [(10 + 0.01 * i, 0.5 + 0.001 * i, f"variant_{i}") for i in range(8)] + [(20.0, 0.0, "far")]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.set_xlim(0, 25), ax.set_ylim(-0.1, 1)
    fig.canvas.draw()
    label_points(ax, points)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text's own box, not its leader line
    assert sorted(t.get_text() for t in ax.texts) == sorted(p[2] for p in points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_headline_keeps_what_dvc_metrics_show_lists():
    from lethe.evaluation.figures import HEADLINE, headline

    full = {key: 0.123456 for key in HEADLINE.values()} | {"replication/rate/dup/ci_low": 0.1, "cost/train_seconds": 9.0}
    assert headline(full) == {name: 0.123 for name in HEADLINE}
    assert headline({"replication/rate/dup": 0.5, "vs_baseline/replication_rate_dup": None}) == {"dup_rate": 0.5}


def test_provenance_lists_each_stages_latest_time_from_mlflow(project, smoke_params):
    import mlflow

    import lethe.tracking
    from lethe.evaluation.provenance import provenance_section
    from lethe.tracking import stage_run

    for stage, started in (("prepare", 100.0), ("prepare", 30.0), ("calibrate", 7.0)):
        lethe.tracking.STARTED = __import__("time").time() - started
        with stage_run(smoke_params, stage=stage, method=stage, sections=(), data_hash=""):
            pass
    with stage_run(smoke_params, stage="memcontrol", method="memcontrol", sections=(), data_hash=""):
        with mlflow.start_run(nested=True):  # an Optuna trial: not a stage
            mlflow.log_metric("cost/stage_seconds", 999.0)
    section = provenance_section(smoke_params.tracking.experiment)
    rows = [line for line in section.splitlines() if line.startswith("| ") and "seconds" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| prepare", "| calibrate", "| memcontrol"]
    assert rows[0].split(" | ")[1].startswith("30.") and rows[1].split(" | ")[1].startswith("7.")
    assert "params.yaml sha256" in section and "cores" in section
    # the latest prepare started 30 s ago and everything after it ran one after another: 30 s of wall time,
    # against 37 s and more of stage time (the earlier prepare is not the latest)
    wall = float(re.search(r"([\d,.]+) s \(([\d.]+) min\) of wall time", section).group(1).replace(",", ""))
    assert 29 <= wall <= 33


def test_wall_time_counts_side_by_side_stages_once_and_skips_the_gaps():
    from lethe.evaluation.provenance import busy_seconds

    # two stages side by side (0-10, 5-12), a gap, then a re-run days later (100000-100003)
    assert busy_seconds([(5, 12), (0, 10), (100_000, 100_003), (6, 8)]) == 15
    assert busy_seconds([]) == 0
