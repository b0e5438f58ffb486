"""`lethe report`: every variant's metrics in one table, with the detection and MemControl sections and
the replication-against-FD trade-off plot.

The same numbers reach three doors: `reports/report.md` and `.html`, `plots/tradeoff.json` (a DVC
plot), and a `report` run in MLflow with the table and the plot as artifacts.
"""

from __future__ import annotations

import json

import mlflow

from lethe.evaluation.provenance import provenance_section
from lethe.evaluation.runs import with_run_noise
from lethe.evaluation.report import (
    LEGEND, aa_section, against_controls, controls_section, data_section, detection_section, html_page, markdown_table, mechanism,
    tradeoff_png, tradeoff_points,
)
from lethe.files import load_outcomes, variant_metrics, write_json, write_text
from lethe.methods import CANDIDATES, REPLICATES, TRAINING, VARIANTS
from lethe.paths import CHOSEN_MASK, LOCALIZE_METRICS, LOYAL_CHOICE, PLOTS, REPORTS, outcomes_file, train_metrics_file
from lethe.registry import choose_champion
from lethe.search.summary import memcontrol_section
from lethe.tracking import stage_run


def report(params) -> str:
    """Write the report; returns its table (markdown)."""
    # every change's interval with training-run noise from the baseline's A/A replicates, Holm on the dup rates
    measured = with_run_noise(variant_metrics(VARIANTS), "baseline", REPLICATES)
    metrics = {v: measured[v] for v in CANDIDATES}
    replicates = {v: measured[v] for v in REPLICATES}
    points = tradeoff_points(metrics)
    # each control or ablation beside the method it controls, where both were evaluated
    controls = {name: method for name, m in TRAINING.items() if m.controls and (method := m.controls(params))}
    pairs = [(method, control) for control, method in controls.items()
             if {method, control} <= set(metrics) and outcomes_file(method).exists() and outcomes_file(control).exists()]
    outcomes = {v: load_outcomes(outcomes_file(v)) for pair in pairs for v in pair}
    runs = int(measured["baseline"]["runs/measured"])
    run_sd = measured["baseline"].get("runs/sd/replication/rate/dup", 0.0)
    sections = (aa_section(replicates)
                + controls_section(against_controls(pairs, outcomes, params.evaluate.bootstrap, run_sd, runs)) + detection_section()
                + memcontrol_section(metrics) + data_section())
    train = {v: _json(train_metrics_file(v)) for v in ("baseline", *metrics)}
    localized, mask, loyal = _json(LOCALIZE_METRICS), _json(CHOSEN_MASK), _json(LOYAL_CHOICE)
    mechanisms = {v: mechanism(v, params, train, localized, mask, loyal, controls) for v in metrics}
    champion, policy = choose_champion(metrics, "baseline", params.registry) if "baseline" in metrics else (None, {})
    galleries = {v: f"evaluate/{v}/gallery.png" for v in metrics if (REPORTS / "evaluate" / v / "gallery.png").exists()}
    tradeoff_png(points, REPORTS / "tradeoff.png")
    write_json(PLOTS / "tradeoff.json", points)
    with stage_run(params, stage="report", method="report", sections=("evaluate", "registry"), data_hash="") as run:
        sections += provenance_section(params.tracking.experiment)  # the stages' times, from MLflow
        write_text(REPORTS / "report.md", "# lethe: variants compared\n\n" + markdown_table(metrics, mechanisms) + "\n"
                   + LEGEND + "\n" + sections)
        # MLflow 3.17's UI picks its GenAI or model-training view from this query (else from the browser's
        # last choice, GenAI at first), not from the experiment's kind tag, which lethe also sets
        runs = f"#/experiments/{run.info.experiment_id}?workflowType=machine_learning"
        write_text(REPORTS / "report.html", html_page(metrics, sections, galleries, policy, champion, runs, mechanisms))
        for name in ("report.md", "report.html", "tradeoff.png"):
            mlflow.log_artifact(str(REPORTS / name))
    return markdown_table(metrics, mechanisms)


def _json(path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
