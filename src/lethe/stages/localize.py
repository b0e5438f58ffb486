"""`lethe localize` (NeMo): find each memorized target prompt's neurons; deactivate their union.

Activation statistics and τ_mem come from the tune split's prompts (never trained on, never judged). Every target prompt is scored; those with
a seed pair above τ_mem (highest first, at most `nemo.max_prompts`) are localized. The union of their neurons is
zeroed in the baseline's W_V rows and saved as `models/nemo`, a pruned model like any other.
"""

from __future__ import annotations

import statistics
import time

import mlflow
import torch

from lethe.config import Params
from lethe.data.prepared import PreparedData, tune_record
from lethe.files import atomic_dir, baseline_costs, content_hash, write_json, write_text
from lethe.localization import nemo
from lethe.models.diffusion_model import build_scheduler, load_model, save_model
from lethe.paths import BASELINE, DATA, LOCALIZE_METRICS, REPORTS, model_dir, train_metrics_file
from lethe.progress import progress
from lethe.sampling import nemo_step
from lethe.tracking import stage_run


@torch.no_grad()
def localize(params: Params) -> dict[str, float]:
    cfg = params.nemo
    data = PreparedData.load(DATA)
    model = load_model(BASELINE)
    scheduler = build_scheduler(model, params.diffusion)
    t, noise = nemo_step(model, scheduler, cfg.seeds)

    stats, tau, target, memorized, target_scores = nemo.calibrate(model, data, t, noise, cfg.holdout_prompts)
    memorized = memorized[: cfg.max_prompts]

    # NeMo's whole search space, blocked at once for each prompt: a guide to whether any set could localize it
    # (the score need not fall as more is blocked, so not a bound)
    every = frozenset((name, c) for name, layer in nemo.value_layers(model.unet).items() for c in range(layer.to_v.out_features))
    rows, union, started = [], set(), time.perf_counter()
    for i in progress(memorized, desc="localize: NeMo prompts", unit="prompt"):
        record, states = target[i], nemo.encode(model, [target[i]])
        activations = nemo.value_activations(model, states)
        z = {layer: values[0] for layer, values in stats.z(activations).items()}
        score = nemo.MemorizationScore(model, t, noise, states, tau)
        begun = time.perf_counter()
        found = nemo.localize(score, z, {k: v[0] for k, v in activations.items()}, tau, cfg.iterations, cfg.batch_size)
        neurons = found.neurons if found is not None else None
        all_blocked = score([every])[0] if len(score.kept) else None
        rows.append({"id": record.id, "caption": record.caption, "dup_count": record.dup_count,
                     "score": float(target_scores[i]), "seeds_kept": len(score.kept),
                     "reached_tau": found.reached_tau if found is not None else None,
                     "score_after": score([neurons])[0] if neurons is not None else None,
                     "score_all_blocked": all_blocked,
                     "neurons": sorted([list(n) for n in neurons]) if neurons is not None else None,
                     "seconds": time.perf_counter() - begun})
        union |= neurons or set()
    seconds = time.perf_counter() - started

    counts = [len(r["neurons"]) for r in rows if r["neurons"] is not None]
    metrics = {
        "nemo/tau_mem": tau,
        "nemo/memorized_prompts": float(len(memorized)),
        "nemo/localized_prompts": float(sum(bool(r["reached_tau"]) for r in rows)),  # an initial set reached τ_mem
        "nemo/median_neurons": float(statistics.median(counts)) if counts else float("nan"),
        "nemo/union_neurons": float(len(union)),
        # prompts whose score falls below τ_mem with every down- and mid-block value neuron blocked
        "nemo/blockable_prompts": float(sum(r["score_all_blocked"] is not None and r["score_all_blocked"] < tau for r in rows)),
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
            # tau_mem's prompts: the tune part's (the noises are the seeds nemo_step draws for every prompt)
            write_json(tmp / "prompts.json", tune_record({"holdout": nemo.tune_prompts(data, cfg.holdout_prompts)}))
        mlflow.log_artifacts(str(REPORTS / "localize"))
    write_json(train_metrics_file("nemo"), {**baseline_costs(), "cost/localize_seconds": seconds})
    write_json(LOCALIZE_METRICS, metrics)
    return metrics


def neuron_table(rows: list[dict], tau: float) -> str:
    lines = [f"# NeMo neurons per memorized prompt (tau_mem = {tau:.3f})", "",
             "| id | caption | copies | score | seeds kept | score after | every neuron blocked | neurons | which |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        which = ", ".join(f"{layer}[{channel}]" for layer, channel in r["neurons"] or [])
        after = "not localized" if r["score_after"] is None else (
            f"{r['score_after']:.3f}" + ("" if r["reached_tau"] else " (τ not reached: the last set, refined)"))
        count = len(r["neurons"]) if r["neurons"] is not None else "–"
        blocked = "–" if r.get("score_all_blocked") is None else f"{r['score_all_blocked']:.3f}"
        lines.append(f"| {r['id']} | {r['caption']} | {r['dup_count']} | {r['score']:.3f} | {r['seeds_kept']} | {after} "
                     f"| {blocked} | {count} | {which} |")
    return "\n".join(lines) + "\n"
