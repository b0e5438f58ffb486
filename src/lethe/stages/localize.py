"""`lethe localize` (NeMo): find each memorized target prompt's neurons; deactivate their union.

Activation statistics and τ_mem come from holdout prompts. Every target prompt is scored; those
above τ_mem (highest first, at most `nemo.max_prompts`) are localized. The union of their neurons is
zeroed in the baseline's W_V rows and saved as `models/nemo`, a pruned model like any other.
"""

from __future__ import annotations

import statistics
import time

import mlflow
import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData
from lethe.files import atomic_dir, baseline_costs, content_hash, write_json, write_text
from lethe.localization import nemo
from lethe.models.diffusion_model import build_scheduler, load_model, save_model
from lethe.paths import BASELINE, DATA, LOCALIZE_METRICS, REPORTS, model_dir, train_metrics_file
from lethe.progress import progress
from lethe.sampling import first_step
from lethe.tracking import stage_run


@torch.no_grad()
def localize(params: Params) -> dict[str, float]:
    cfg = params.nemo
    data = PreparedData.load(DATA)
    model = load_model(BASELINE)
    scheduler = build_scheduler(model, params.diffusion)
    t, noise = first_step(model, scheduler, params.sample.steps, cfg.seeds)

    stats, tau, target, memorized, target_scores = nemo.calibrate(model, data, t, noise, cfg.holdout_prompts)
    memorized = memorized[: cfg.max_prompts]

    rows, union, started = [], set(), time.perf_counter()
    for i in progress(memorized, desc="localize: NeMo prompts", unit="prompt"):
        record, states = target[i], nemo.encode(model, [target[i]])
        z = {layer: values[0] for layer, values in stats.z(nemo.value_activations(model, states)).items()}
        score = nemo.MemorizationScore(model, t, noise, states)
        begun = time.perf_counter()
        neurons = nemo.localize(score, z, tau, cfg.iterations, cfg.batch_size)
        after = score([neurons])[0] if neurons is not None else None
        rows.append({"id": record.id, "caption": record.caption, "dup_count": record.dup_count,
                     "score": float(target_scores[i]), "score_after": after,
                     "neurons": sorted([list(n) for n in neurons]) if neurons is not None else None,
                     "seconds": time.perf_counter() - begun})
        union |= neurons or set()
    seconds = time.perf_counter() - started

    counts = [len(r["neurons"]) for r in rows if r["neurons"] is not None]
    metrics = {
        "nemo/tau_mem": tau,
        "nemo/memorized_prompts": float(len(memorized)),
        "nemo/localized_prompts": float(len(counts)),
        "nemo/median_neurons": float(statistics.median(counts)) if counts else float("nan"),
        "nemo/union_neurons": float(len(union)),
        "nemo/seconds_per_prompt": seconds / max(len(memorized), 1),
    }
    with stage_run(params, stage="localize", method="nemo", sections=("nemo", "sample"), data_hash=content_hash(DATA)):
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
        pruned = load_model(BASELINE)
        nemo.deactivate(pruned, union)
        with atomic_dir(model_dir("nemo")) as tmp:
            save_model(pruned, tmp, method="nemo", nemo={"tau_mem": tau, "neurons": sorted([list(n) for n in union])})
        with atomic_dir(REPORTS / "localize") as tmp:
            write_json(tmp / "neurons.json", rows)
            write_text(tmp / "neurons.md", neuron_table(rows, tau))
        mlflow.log_artifacts(str(REPORTS / "localize"))
    write_json(train_metrics_file("nemo"), {**baseline_costs(), "cost/localize_seconds": seconds})
    write_json(LOCALIZE_METRICS, metrics)
    return metrics


def neuron_table(rows: list[dict], tau: float) -> str:
    lines = [f"# NeMo neurons per memorized prompt (tau_mem = {tau:.3f})", "",
             "| id | caption | copies | score | score after | neurons | which |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        which = ", ".join(f"{layer}[{channel}]" for layer, channel in r["neurons"] or [])
        after = f"{r['score_after']:.3f}" if r["score_after"] is not None else "not localized"
        count = len(r["neurons"]) if r["neurons"] is not None else "–"
        lines.append(f"| {r['id']} | {r['caption']} | {r['dup_count']} | {r['score']:.3f} | {after} | {count} | {which} |")
    return "\n".join(lines) + "\n"
