"""`lethe detect`: on the baseline, how well each memorization score flags memorized prompts.

K generations per prompt for the dup, unique and holdout prompts, sampled with a `SamplingTrace`
(Wen's magnitudes and the attention maps come free with guided sampling), plus NeMo's first-step
score over its own seeds. Each score is averaged over a prompt's generations and judged against two
ground truths: `measured` (at least `detect.memorized_share` of the prompt's baseline generations
replicate a training image, by `evaluate.criterion`; all three groups) and `planted` (dup prompts
against holdout prompts, which were never trained on).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from lethe.config import Params  # noqa: E402
from lethe.data.prepared import PreparedData  # noqa: E402
from lethe.errors import LetheError  # noqa: E402
from lethe.evaluation.intervals import with_intervals  # noqa: E402
from lethe.evaluation.metrics import TrainingSet  # noqa: E402
from lethe.files import atomic_dir, content_hash, write_json  # noqa: E402
from lethe.memorization.attention import cross_attention_layers  # noqa: E402
from lethe.memorization.detectors import begin_mass, detection_quality, memattn_scores, nemo_scores, wen_scores  # noqa: E402
from lethe.memorization.noise_magnitude import first_step_magnitudes  # noqa: E402
from lethe.models.diffusion_model import build_scheduler, load_model  # noqa: E402
from lethe.paths import BASELINE, DATA, DETECT_METRICS, REPORTS  # noqa: E402
from lethe.sampling import SamplingTrace, generate, nemo_step  # noqa: E402
from lethe.tracking import stage_run  # noqa: E402

SCORES = ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim")


def prompt_scores(params: Params, model, scheduler, prompts: list[str], training: TrainingSet) -> dict[str, torch.Tensor]:
    """Per prompt: every detection score and the share of its generations that replicate."""
    cfg = params.detect
    k = cfg.generations_per_prompt
    trace = SamplingTrace()
    started = time.perf_counter()
    images = generate(model, scheduler, [p for p in prompts for _ in range(k)], list(range(k)) * len(prompts),
                      params.sample, trace, label="detect: sampling")
    seconds = time.perf_counter() - started
    per_generation = {**wen_scores(trace.magnitudes),
                      **memattn_scores(trace.maps, trace.token_ids, model.text_encoder.end_token_id, cfg.memattn_layer)}
    per_generation["begin_mass"] = begin_mass(trace.maps, cfg.memattn_layer)
    scores = {name: values.view(-1, k).mean(1) for name, values in per_generation.items()}
    t, noise = nemo_step(model, scheduler, cfg.nemo_seeds)
    states = model.encode_text(model.text_encoder.tokenize(prompts)).detach()
    scores["nemo_ssim"] = nemo_scores(model.unet, t, noise.to(states.device), states).cpu()
    scores["replicated_share"] = training.replication(images)["copied"].float().view(-1, k).mean(1)
    scores["sampling_seconds"] = torch.tensor(seconds)
    return scores


def detect(params: Params) -> dict[str, float]:
    cfg = params.detect
    data = PreparedData.load(DATA)
    model = load_model(BASELINE)
    scheduler = build_scheduler(model, params.diffusion)
    layers = len(cross_attention_layers(model.unet))
    if cfg.memattn_layer >= layers:
        raise LetheError(f"params.yaml: 'detect.memattn_layer' = {cfg.memattn_layer} but the U-Net has {layers} cross-attention layers")
    records = [(group, r) for group, rs in data.prompt_groups(cfg.prompts_per_group).items() for r in rs]
    groups = np.array([g for g, _ in records])
    with torch.no_grad():
        scores = prompt_scores(params, model, scheduler, [r.caption for _, r in records], TrainingSet.load(data, params.evaluate))
    measured = (scores["replicated_share"] >= cfg.memorized_share).numpy()
    planted = np.flatnonzero(groups != "unique")
    metrics: dict[str, float] = {"prompts/dup": float((groups == "dup").sum())}
    for name in SCORES:
        values = scores[name].numpy()
        # 95% intervals: prompts resampled (NaN draws, with one class only, are left out)
        metrics |= with_intervals(lambda rows: {f"detection/{name}/{k}": v for k, v in
                                                detection_quality(values[rows], measured[rows]).items()},
                                  len(values), params.evaluate.bootstrap)
        metrics |= with_intervals(lambda rows: {f"detection/{name}/planted_{k}": v for k, v in
                                                detection_quality(values[planted[rows]], groups[planted[rows]] == "dup").items()},
                                  len(planted), params.evaluate.bootstrap)
        for group in ("dup", "unique", "holdout"):
            if (groups == group).any():
                metrics[f"detection/{name}/mean/{group}"] = float(values[groups == group].mean())
    begin = scores["begin_mass"].numpy()
    for label, rows in (("memorized", measured), ("other", ~measured)):
        metrics[f"detection/memattn_begin_mass/{label}"] = float(begin[rows].mean()) if rows.any() else float("nan")
    for group in ("dup", "unique", "holdout"):
        metrics[f"detection/memorized_share/{group}"] = float(measured[groups == group].mean()) if (groups == group).any() else 0.0
    metrics["cost/seconds_per_image"] = float(scores["sampling_seconds"]) / (len(records) * cfg.generations_per_prompt)
    # Wen's inference-time target reads this, the tune split's mean first-step magnitude: a choice made from
    # outputs, so from prompts that are never judged
    tune = data.tune_groups(cfg.prompts_per_group)["holdout"]
    if tune:
        magnitudes = first_step_magnitudes(model, scheduler, [r.caption for r in tune], cfg.generations_per_prompt,
                                           params.sample.steps)
        metrics["detection/wen_first/mean/tune"] = float(magnitudes.mean())

    with stage_run(params, stage="detect", method="baseline", sections=("detect", "sample"), data_hash=content_hash(DATA)):
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        with atomic_dir(REPORTS / "detect") as tmp:
            rows = [{"group": g, "id": r.id, "caption": r.caption, "memorized": bool(m),
                     **{name: float(scores[name][i]) for name in (*SCORES, "replicated_share")}}
                    for i, ((g, r), m) in enumerate(zip(records, measured))]
            write_json(tmp / "scores.json", rows)
            roc_plot(scores, measured, groups, tmp / "roc.png")
        mlflow.log_artifacts(str(REPORTS / "detect"))
    write_json(DETECT_METRICS, metrics)
    return metrics


def roc_plot(scores: dict[str, torch.Tensor], measured: np.ndarray, groups: np.ndarray, path: Path) -> None:
    planted = groups != "unique"
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, title, mask, truth in ((axes[0], "measured: baseline replicates", np.ones_like(measured), measured),
                                     (axes[1], "planted: dup vs holdout", planted, groups == "dup")):
        if truth[mask].all() or not truth[mask].any():  # e.g. no dup group: nothing to draw, and said so
            axis.text(0.5, 0.5, "one class only: no curve", ha="center")
        else:
            for name in SCORES:
                fpr, tpr, _ = roc_curve(truth[mask], scores[name].numpy()[mask])
                axis.plot(fpr, tpr, label=name)
            axis.legend(loc="lower right", fontsize=8)
        axis.plot([0, 1], [0, 1], color="grey", lw=0.5)
        axis.set(title=title, xlabel="false positive rate", ylabel="true positive rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
