"""`lethe audit`: which of the training images does a model reproduce, and from which prompts?

Two ways in:
- `lethe audit <variant>` (and `champion`, the registry's): a model of this pipeline, audited on the
  prepared target split, with the holdout split calibrating the threshold (the DVC stages `audit@*`);
- `lethe audit --model DIR [--lora FILE] --images FOLDER [--holdout FOLDER] [--prompts FILE] --name NAME`:
  a model a user brings (a lethe model, a diffusers pipeline, or one plus LoRA weights) and the image
  folder it was fine-tuned on (`metadata.jsonl` with `file_name` and `text`).

The algorithm is in `lethe.memorization.audit`. An audit of a variant states, beside its own guarantee,
the pipeline's generation null from `metrics/calibration.json` (`lethe calibrate`: the pretrained model's
generations for the target captions, which copy none of them, and the share its calibrated relative-L2
threshold flags); a model a user brings has none. Writes `reports/audit/<name>/` (`audit.json`, `index.html`,
`risk.png`) and `reports/audit/<name>.json` (the summary), and logs the run `audit@<name>` to MLflow.
Generations are kept per batch under `.lethe/audit/<name>/`, so a killed audit resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lethe.config import Params
from lethe.errors import LetheError
from lethe.files import atomic_dir, content_hash, fingerprint, write_json
from lethe.memorization.audit import (
    Judged, calibrated_threshold, generation_rate, reproduced_share, select, share_with_interval,
)
from lethe.memorization.replication import Criteria, pixel_scores
from lethe.paths import AUDIT_CACHE, CALIBRATION, DATA, REGISTRY, audit_dir, audit_summary, model_dir
from lethe.progress import progress


@dataclass
class TrainingImages:
    """What the model was fine-tuned on, and held-out images of the same domain (None: none given)."""

    pixels: torch.Tensor  # N x C x H x W in [-1, 1]
    captions: list[str]
    names: list[str]
    holdout: torch.Tensor | None
    source: str  # where they came from, for the page
    planted: np.ndarray | None = None  # the embedded default's ground truth: planted duplicates


def champion_variant() -> str:
    """The variant the registry's `champion` alias points at (`reports/registry.json`, from `lethe register`)."""
    if not REGISTRY.exists():
        raise LetheError(f"{REGISTRY}: missing; run `dvc repro register` first (it chooses the champion)")
    registry = json.loads(REGISTRY.read_text())
    champion = registry.get("aliases", {}).get("champion")
    for variant, version in registry.get("versions", {}).items():
        if version == champion:
            return variant
    raise LetheError(f"{REGISTRY}: no variant holds the 'champion' alias")


def pipeline_images() -> TrainingImages:
    """The prepared target split, one image per picture, less the tune part (which the tuning stages chose
    on, so an audit of their models would favour them), and the holdout split."""
    from lethe.data.prepared import JUDGE, PreparedData

    data = PreparedData.load(DATA)
    target = [r for r in data.pictures("target") if r.part == JUDGE]
    return TrainingImages(data.tensor([r.id for r in target]), [r.caption for r in target], [r.source for r in target],
                          data.tensor([r.id for r in data.pictures("holdout")]), f"{DATA} (target split)",
                          np.array([r.dup_count > 1 for r in target]))


def generation_null(variant: str | None) -> dict[str, float] | None:
    """For a variant of this pipeline, the generation null `lethe calibrate` measured (relative L2, the
    audit's criterion): its rate with the exact 95% interval, the number of null generations, and the
    threshold and holdout share it was measured at. None for a model a user brought (no model known never
    to have seen its images generated for its captions), or when `metrics/calibration.json` holds no null."""
    if variant is None or not CALIBRATION.exists():
        return None
    c = json.loads(CALIBRATION.read_text())
    key = "calibration/rel_l2/generation_null_rate"
    if c.get(key) is None:  # never measured, or no null generations (NaN, written as null)
        return None
    return {"rate": c[key], "ci_low": c[f"{key}/ci_low"], "ci_high": c[f"{key}/ci_high"],
            "images": c["calibration/generation_null_images"], "threshold": c["calibration/rel_l2/threshold"],
            "fpr_target": c["calibration/fpr_target"]}


def folder_images(folder: str, holdout: str | None, resolution: int, channels: int) -> TrainingImages:
    from lethe.data.prepared import to_float
    from lethe.data.sources import read_image_folder

    for path in (folder, holdout):
        if path is not None and not Path(path).is_dir():
            raise LetheError(f"{path}: no such image folder")
    images, captions, names = read_image_folder(folder, resolution, channels)
    held = to_float(read_image_folder(holdout, resolution, channels)[0]) if holdout else None
    return TrainingImages(to_float(images), captions, names, held, folder)


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is skipped
    except (OSError, UnicodeDecodeError) as exc:
        raise LetheError(f"{path}: cannot read the prompts file ({type(exc).__name__}); one prompt per line, UTF-8")
    return [line.strip() for line in lines if line.strip()]


def check_vocabulary(model, captions: list[str], where: str) -> None:
    """Refuse captions the model's tokenizer knows nothing of: every generation would ignore them."""
    if model.text_encoder.known_tokens(captions) == 0:
        raise LetheError(f"{where}: no word of any caption is in the model's tokenizer vocabulary; "
                         "these are not the captions this model was trained with")


def _batch_file(directory: Path, key: str) -> Path:
    return directory / f"{hashlib.md5(key.encode()).hexdigest()}.npy"


def _cached(directory: Path, key: str, compute) -> np.ndarray:
    """A batch of uint8 images kept on disk by content key: a killed audit reloads what it had made."""
    path = _batch_file(directory, key)
    if path.exists():
        return np.load(path)
    images = compute()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, images)
    tmp.replace(path)
    return images


@dataclass
class Generations:
    """What generation found: every generation judged, where its pixels are kept, and per prompt how many
    generations it got and how many were copies."""

    judged: Judged
    where: list[tuple[str, int]]  # per generation: its batch's cache key and its row there
    generations: np.ndarray
    copies: np.ndarray


def generate_and_judge(model, scheduler, prompts: list[str], selected: list[int], rounds: int, k: int,
                       stop_at_copy: bool, data: TrainingImages, threshold: float, params: Params, cache: Path,
                       model_key: str) -> Generations:
    """Up to `rounds` generations per selected prompt (seed: prompt x K + round), each batch judged as it
    comes and kept on disk; with `stop_at_copy`, a prompt stops at its first copy."""
    from lethe.data.prepared import to_float, to_uint8
    from lethe.sampling import generate

    sample, n, chunk = params.sample, params.evaluate.rel_l2_n, params.evaluate.chunk_size
    out = Generations(Judged(), [], np.zeros(len(prompts), dtype=int), np.zeros(len(prompts), dtype=int))
    bar = progress(total=len(selected) * rounds, desc="audit: generate", unit="img")
    for round_ in range(rounds):
        for s in range(0, len(selected), sample.batch_size):
            batch = selected[s : s + sample.batch_size]
            texts, seeds = [prompts[p] for p in batch], [p * k + round_ for p in batch]
            key = model_key + json.dumps([texts, seeds])
            made = _cached(cache, key, lambda texts=texts, seeds=seeds: to_uint8(generate(model, scheduler, texts, seeds, sample)))
            out.where += [(key, row) for row in range(len(batch))]
            best = out.judged.add(batch, seeds, to_float(made), data.pixels, n, chunk)
            out.copies[batch] += (best < threshold).numpy()
            out.generations[batch] += 1
            bar.update(len(batch))
        if stop_at_copy:  # one copy answers the question for its prompt
            selected = [p for p in selected if out.copies[p] == 0]
    bar.close()
    return out


def open_inputs(target, model_path, lora, images, holdout, name):
    """The model and the images: a variant of this pipeline on the prepared splits, or what a user brought."""
    from lethe.models.brought import load_brought_model

    if target is not None:
        variant = champion_variant() if target == "champion" else target
        model_path = str(model_dir(variant))
        return load_brought_model(model_path), model_path, variant, name or target, pipeline_images(), content_hash(DATA)
    if model_path is None or images is None:
        raise LetheError("lethe audit: give a variant (e.g. `lethe audit baseline`) or --model and --images")
    model = load_brought_model(model_path, lora)
    data = folder_images(images, holdout, model.spec.resolution, model.spec.channels)
    check_vocabulary(model, data.captions, f"{Path(images) / 'metadata.jsonl'}")
    return model, model_path, None, name or Path(model_path).resolve().name, data, content_hash(Path(images) / "metadata.jsonl")


def audit(params: Params, target: str | None = None, model_path: str | None = None, lora: str | None = None,
          images: str | None = None, holdout: str | None = None, prompts_file: str | None = None,
          name: str | None = None, full: bool = False) -> dict[str, float]:
    import mlflow

    from lethe.data.prepared import to_uint8
    from lethe.devices import inference_device
    from lethe.evaluation.audit_page import audit_page, risk_histogram
    from lethe.memorization.noise_magnitude import first_step_magnitudes
    from lethe.models.diffusion_model import build_scheduler
    from lethe.tracking import stage_run

    cfg, sample = params.audit, params.sample
    model, model_path, variant, name, data, data_hash = open_inputs(target, model_path, lora, images, holdout, name)
    extra = read_prompts(prompts_file)
    scheduler = build_scheduler(model, params.diffusion)
    model.to(inference_device())
    captions = set(data.captions)
    prompts = list(dict.fromkeys(data.captions)) + [p for p in dict.fromkeys(extra) if p not in captions]
    index = {p: i for i, p in enumerate(prompts)}
    prompt_of_image = np.array([index[c] for c in data.captions])
    k, mode = cfg.generations_per_prompt, "full" if full or cfg.mode == "full" else "screen"

    # 1. screen every prompt with Wen's first-step magnitude
    screen = torch.cat([first_step_magnitudes(model, scheduler, prompts[s : s + sample.batch_size], cfg.screen_seeds, sample.steps)
                        for s in progress(range(0, len(prompts), sample.batch_size), desc="audit: screen", unit="batch")]).numpy()
    # 2. select the prompts to generate for
    if mode == "full":
        top, drawn = np.arange(len(prompts)), np.array([], dtype=int)
    else:
        top, drawn = select(screen, cfg.generate_share, cfg.random_share, cfg.seed)
    # the threshold, from held-out images when there are some
    alpha = generation_rate(cfg.fpr, len(data.pixels), len(prompts), k)
    if data.holdout is not None:
        criteria = Criteria(rel_l2_n=params.evaluate.rel_l2_n, chunk_size=params.evaluate.chunk_size)
        held_out = pixel_scores(data.holdout, data.pixels, criteria)["rel_l2"]  # the evaluation's own criterion
        threshold = calibrated_threshold(held_out, alpha, holdout or f"{DATA} (holdout split)")
    else:
        threshold = params.evaluate.rel_l2_threshold
    # 3. generate, judging each batch as it comes
    cache = AUDIT_CACHE / name
    cache.mkdir(parents=True, exist_ok=True)
    code = Path(__file__).resolve().parents[1]  # the sampler and the inference-time mitigations make the images
    source = [code / "sampling.py", *sorted((code / "inference").glob("*.py"))]
    model_key = (fingerprint([Path(model_path)] + ([Path(lora)] if lora else []))
                 + "".join(content_hash(file) for file in source)
                 + json.dumps([sample.model_dump(), params.diffusion.model_dump()]))
    rounds = k if mode == "full" else min(k, cfg.screen_generations)
    made = generate_and_judge(model, scheduler, prompts, [int(p) for p in np.concatenate([top, drawn])], rounds, k,
                              mode == "screen", data, threshold, params, cache, model_key)
    # 4. judge every training image by its closest generation
    closest = made.judged.per_image(len(data.pixels), keep=max(3, k))
    score = np.array([c[0][1] if c else np.inf for c in closest])
    reproduced = score < threshold
    in_top, in_drawn = np.isin(prompt_of_image, top), np.isin(prompt_of_image, drawn)
    metrics = {
        "audit/images": float(len(data.pixels)), "audit/prompts": float(len(prompts)),
        "audit/prompts_generated": float((made.generations > 0).sum()), "audit/generations": float(len(made.judged)),
        "audit/generation_share": len(made.judged) / (len(prompts) * k),  # of what full mode generates
        "audit/screen_passes": float(len(prompts) * cfg.screen_seeds),
        "audit/threshold": threshold, "audit/threshold_calibrated": float(data.holdout is not None),
        "audit/holdout_images": float(len(data.holdout) if data.holdout is not None else 0),
        "audit/reproduced": float(reproduced.sum()),
        "audit/generation_rate": alpha,
        **reproduced_share(reproduced, None if mode == "full" else np.flatnonzero(in_top),
                           None if mode == "full" else np.flatnonzero(in_drawn & ~in_top)),
    }
    if data.planted is not None and data.planted.any():  # the embedded default's ground truth
        metrics |= share_with_interval("audit/planted_recall", reproduced[data.planted])
        if (~data.planted).any():
            metrics |= share_with_interval("audit/other_flagged_share", reproduced[~data.planted])

    def found(g: int, value: float) -> dict:
        return {"prompt": prompts[made.judged.prompt[g]], "seed": made.judged.seed[g], "relative_l2": value}

    def pixels(g: int) -> np.ndarray:
        key, row = made.where[g]
        return np.load(_batch_file(cache, key), mmap_mode="r")[row]

    entries = [{"file_name": data.names[i], "caption": data.captions[i], "risk": max(0.0, 1.0 - float(score[i])),
                "reproduced": bool(reproduced[i]), "screen": float(screen[prompt_of_image[i]]),
                "caption_generated": bool(made.generations[prompt_of_image[i]] > 0),
                "reproduced_by": [found(g, v) for g, v in closest[i] if v < threshold],
                "closest": [found(g, v) for g, v in closest[i][:3]]} for i in range(len(data.pixels))]
    chosen = {**{int(p): "random" for p in drawn}, **{int(p): "top" if mode == "screen" else "all" for p in top}}
    prompt_entries = [{"prompt": p, "source": "caption" if p in captions else "extra", "screen": float(screen[i]),
                       "selected": chosen.get(i, "no"), "generations": int(made.generations[i]),
                       "copies": int(made.copies[i])} for i, p in enumerate(prompts)]
    summary = {"name": name, "model": model_path, "lora": lora, "variant": variant, "images": data.source,
               "mode": mode, "fpr": cfg.fpr, "inference": sorted(model.spec.inference), "metrics": metrics,
               "generation_null": generation_null(variant)}
    ranked = sorted(range(len(entries)), key=lambda i: -entries[i]["risk"])
    with atomic_dir(audit_dir(name)) as tmp:
        write_json(tmp / "audit.json", {**summary, "training_images": entries, "prompts": prompt_entries})
        risk_histogram([e["risk"] for e in entries], 1.0 - threshold, tmp / "risk.png")
        shown = [(entries[i], to_uint8(data.pixels[i]), [pixels(g) for g, _ in closest[i][:3]])
                 for i in ranked[: max(cfg.shown, int(reproduced.sum()))]]
        (tmp / "index.html").write_text(audit_page(summary, shown, prompt_entries, tmp / "risk.png"))
    write_json(audit_summary(name), metrics)  # beside the page before MLflow, which may fail on its own
    with stage_run(params, stage="audit", method=name, sections=("audit", "sample"), data_hash=data_hash):
        mlflow.log_metrics({key: value for key, value in metrics.items() if np.isfinite(value)})
        mlflow.log_artifacts(str(audit_dir(name)), "audit")
    used = {_batch_file(cache, key) for key, _ in made.where}
    for stale in set(cache.glob("*.npy")) - used:  # batches of an earlier model or settings
        stale.unlink()
    return metrics
