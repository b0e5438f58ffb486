"""`lethe select_loyal`: LoyalDiffusion's skips and timestep split, measured (`lethe.search.loyal`).

Skip importance on the pretrained model (FD of the holdout prompts' generations with one skip zeroed, paired
with the intact model's), memorization over t on the baseline (planted and holdout images noised to t and
denoised). Writes the choice `search/loyal.json`, which train@loyal and train@raunet read, its figures
`metrics/search/loyal.json`, and the analysis `reports/loyal/` (analysis.md, skips.png, timesteps.png).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lethe.config import Params  # noqa: E402
from lethe.data.prepared import PreparedData, tune_record  # noqa: E402
from lethe.devices import inference_device  # noqa: E402
from lethe.evaluation.metrics import (TUNE_SEEDS, FeatureDistances, TrainingSet, criteria, generation_plan, quality_features,  # noqa: E402
                                     replication_features)
from lethe.files import atomic_dir, content_hash, write_json, write_text  # noqa: E402
from lethe.models.diffusion_model import build_scheduler, load_model  # noqa: E402
from lethe.models.raunet import level_skips  # noqa: E402
from lethe.paths import BASELINE, DATA, LOYAL_CHOICE, LOYAL_METRICS, PRETRAINED, REPORTS  # noqa: E402
from lethe.search import loyal  # noqa: E402
from lethe.tracking import stage_run  # noqa: E402

OUT = REPORTS / "loyal"


def select_loyal(params: Params) -> dict:
    cfg, sample, evaluate = params.loyal, params.sample, params.evaluate
    if cfg.choose == "fixed":  # nothing to measure: the choice is the params', written for the report
        unet = load_model(PRETRAINED).unet
        choice = {"skips": [list(s) for s in level_skips(unet, cfg.levels)], "tau": cfg.tau, "tau_from": "fixed",
                  "skips_total": len(loyal.all_skips(unet))}
        write_text(OUT / "analysis.md", "# LoyalDiffusion\n\nloyal.choose: fixed; nothing measured: every skip of "
                   f"levels {list(cfg.levels)}, tau = {cfg.tau}.\n")
        write_json(LOYAL_CHOICE, choice)
        write_json(LOYAL_METRICS, {"loyal/skips_chosen": float(len(choice["skips"])), "loyal/tau": float(cfg.tau)})
        return choice
    data = PreparedData.load(DATA)
    # the tune part only: its never-trained pictures for FD, its planted pictures for memorization over t,
    # seeds from TUNE_SEEDS; evaluate judges none of them (reports/loyal/prompts.json records which)
    tune = data.require_tune("select_loyal")
    groups = {name: records[: evaluate.prompts_per_group] for name, records in tune.items()}
    holdout_pixels = data.tensor([r.id for r in tune["holdout"]])
    featurize = replication_features(evaluate)
    featurizer = quality_features(evaluate, holdout_pixels, featurize)
    with torch.no_grad():
        distances = FeatureDistances(featurizer(holdout_pixels).double())

    pretrained = load_model(PRETRAINED).to(inference_device())
    scheduler = build_scheduler(pretrained, params.diffusion)
    skips = loyal.all_skips(pretrained.unet)
    k = evaluate.generations_per_prompt
    prompts, seeds = generation_plan([r.caption for r in groups["holdout"]], k, TUNE_SEEDS)

    @torch.no_grad()
    def generated_features(skip):
        return featurizer(loyal.generate_without(pretrained, scheduler, skip, prompts, seeds, sample, "pretrained")).double()

    importance = loyal.skip_importance(generated_features, skips, distances, len(groups["holdout"]), k, evaluate.bootstrap)

    pretrained = None  # one model on the device at a time (Stable Diffusion)
    threshold = criteria(evaluate).sim_threshold
    over_t, tau, tau_from = [], cfg.tau, "loyal.tau: no planted pictures in the tune part (data.tune_dup)"
    if groups["dup"]:  # an image folder without copies has none: said, not invented
        baseline = load_model(BASELINE).to(inference_device())
        training = TrainingSet.load(data, evaluate)
        dup_prompts, dup_seeds = generation_plan([r.caption for r in groups["dup"]], k, TUNE_SEEDS)

        def copied_with(skip):  # the baseline's planted prompts with one skip zeroed: which generations copy
            images = loyal.generate_without(baseline, scheduler, skip, dup_prompts, dup_seeds, sample, "baseline")
            return training.replication(images)["copied"].numpy()

        sensitivity = loyal.replication_sensitivity(copied_with, skips, len(groups["dup"]), k, evaluate.bootstrap)
        importance = [row | sensitivity[tuple(row["skip"])] for row in importance]
        sets = [loyal.Group(name, data.tensor([r.id for r in groups[name]]), [r.caption for r in groups[name]])
                for name in ("dup", "holdout")]
        over_t = loyal.memorization_over_t(
            lambda images, captions, t: loyal.denoise_from(baseline, scheduler, images, captions, t, sample.steps,
                                                           sample.guidance_scale, sample.batch_size),
            lambda images: featurize(images).float(), sets, loyal.analysis_timesteps(scheduler, sample.steps, cfg.timesteps),
            threshold, evaluate.bootstrap)
        measured = loyal.split_at(over_t, cfg.gap_share)
        tau, tau_from = (measured, "measured") if measured is not None else (tau, "loyal.tau: no t shows a memorization gap")
    by = cfg.skip_by if groups["dup"] else "quality"  # no planted prompts: no replication to cut
    chosen_skips = loyal.choose_skips(importance, cfg.skip_share, by)

    choice = {"skips": [list(s) for s in chosen_skips], "skips_by": by, "tau": tau, "tau_from": tau_from,
              "skips_total": len(skips), "sim_threshold": threshold}
    metrics = {"loyal/skips_chosen": float(len(chosen_skips)), "loyal/skips_total": float(len(skips)),
               "loyal/tau": float(tau), **({"loyal/gap_peak": max(row["gap"] for row in over_t)} if over_t else {}),
               **{f"loyal/fd_change/skip_{r['skip'][0]}_{r['skip'][1]}": r["fd_change"] for r in importance}}
    with stage_run(params, stage="select_loyal", method="loyal", sections=("loyal", "sample"), data_hash=content_hash(DATA)):
        mlflow.log_metrics(metrics)
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "analysis.json", {"skips": importance, "timesteps": over_t, "choice": choice})
            write_json(tmp / "prompts.json", tune_record(groups, seeds, dup_seeds if groups["dup"] else []))
            write_text(tmp / "analysis.md", analysis_markdown(importance, over_t, choice, cfg.skip_share, cfg.gap_share))
            skips_plot(importance, chosen_skips, tmp / "skips.png")
            if over_t:
                timesteps_plot(over_t, tau, tmp / "timesteps.png")
        mlflow.log_artifacts(str(OUT), "loyal")
    write_json(LOYAL_CHOICE, choice)
    write_json(LOYAL_METRICS, metrics)
    return choice


def analysis_markdown(importance: list[dict], over_t: list[dict], choice: dict, skip_share: float, gap_share: float) -> str:
    chosen = {tuple(s) for s in choice["skips"]}
    lines = ["# LoyalDiffusion: where the transfer blocks go and from which t", "",
             f"## Skip importance (the pretrained model's FD intact: {importance[0]['fd_intact']:.2f})", "",
             "Each skip zeroed alone. FD: the pretrained model's generations for the holdout prompts against its intact",
             "generations (same prompts and seeds), 95% half-sample interval over prompts. Replication: the baseline's",
             "generations for the planted prompts, the change of their replication rate, paired bootstrap interval.",
             f"The {skip_share:.0%} of the skips {'costing least FD' if choice['skips_by'] == 'quality' else 'cutting replication most'}"
             " get blocks.", "",
             "| skip (level, index) | FD change | relative [95%] | replication change [95%] | blocked |", "|---|---|---|---|---|"]
    for r in importance:
        replication = (f"{r['replication_change']:+.3f} [{r['replication_change_low']:+.3f}, {r['replication_change_high']:+.3f}]"
                       if "replication_change" in r else "–")
        lines.append(f"| {tuple(r['skip'])} | {r['fd_change']:+.2f} | {r['fd_relative']:+.0%} "
                     f"[{r['fd_relative_low']:+.0%}, {r['fd_relative_high']:+.0%}] | {replication} | "
                     f"{'yes' if tuple(r['skip']) in chosen else ''} |")
    lines += ["", "## Memorization over t on the baseline", ""]
    if over_t:
        lines += ["Images noised to t and denoised with their captions; a copy when the features' cosine similarity to",
                  f"the source reaches {choice['sim_threshold']:.3f} (calibrated). Gap = planted − holdout; tau = the smallest",
                  f"t whose gap reaches {gap_share:.0%} of the peak.", "",
                  "| t | planted copied [95%] | holdout copied [95%] | gap |", "|---|---|---|---|"]
    else:
        lines.append("Not measured: no planted (dup) pictures.")
    for r in over_t:
        lines.append(f"| {r['t']} | {r['dup']:.2f} [{r['dup/ci_low']:.2f}, {r['dup/ci_high']:.2f}] | "
                     f"{r['holdout']:.2f} [{r['holdout/ci_low']:.2f}, {r['holdout/ci_high']:.2f}] | {r['gap']:+.2f} |")
    lines += ["", f"**Chosen:** skips {choice['skips']} of {choice['skips_total']}; tau = {choice['tau']} ({choice['tau_from']}).", ""]
    return "\n".join(lines)


def skips_plot(importance: list[dict], chosen: list[tuple[int, int]], path) -> None:
    names = [str(tuple(r["skip"])) for r in importance]
    values = np.array([r["fd_relative"] for r in importance]) * 100
    errors = np.abs(np.array([[r["fd_relative_low"], r["fd_relative_high"]] for r in importance]).T * 100 - values)
    colours = ["tab:green" if tuple(r["skip"]) in set(chosen) else "tab:grey" for r in importance]
    figure, axis = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 3.5))
    axis.bar(names, values, yerr=errors, color=colours, capsize=3)
    axis.set(xlabel="skip (up-block level, index)", ylabel="FD change when zeroed (%)",
             title="skip importance (green: gets a transfer block)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def timesteps_plot(over_t: list[dict], tau: int, path) -> None:
    t = [r["t"] for r in over_t]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, colour in (("dup", "tab:red"), ("holdout", "tab:blue")):
        axis.plot(t, [r[name] for r in over_t], marker="o", color=colour, label={"dup": "planted", "holdout": "holdout"}[name])
        axis.fill_between(t, [r[f"{name}/ci_low"] for r in over_t], [r[f"{name}/ci_high"] for r in over_t], color=colour, alpha=0.15)
    axis.axvline(tau, color="black", ls="--", lw=1, label=f"tau = {tau}")
    axis.set(xlabel="t (noised to, then denoised)", ylabel="copied its source", ylim=(-0.02, 1.02),
             title="where memorization arises")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
