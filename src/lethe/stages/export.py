"""`lethe export <variant> | champion | models:/<name>@<alias> --to DIR [--fuse]`: a model out of lethe, in
diffusers' own formats (`lethe.export`), with `lethe.json` saying where it came from.

A variant is read from `models/<variant>/` with this params file's sampler; `champion` (the registry's
`registry.model_name`) or a `models:/` URI is resolved through MLflow, and the version's own files and
sampler settings are exported; the version then carries tags naming the export. Written into a temporary
folder beside `--to` and renamed, so a refusal or a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lethe.config import DiffusionConfig, Params, SampleConfig
from lethe.errors import LetheError
from lethe.files import atomic_dir
from lethe.methods import VARIANTS
from lethe.paths import CHOSEN_MASK, PRETRAINED, model_dir


@dataclass
class Source:
    variant: str
    model_dir: Path
    sample: SampleConfig
    diffusion: DiffusionConfig
    registry: dict = field(default_factory=dict)  # model, version, alias, metrics: where resolved through MLflow


def registry_source(params: Params, target: str, downloads: Path) -> Source:
    """The model version an alias points at, its files downloaded into `downloads`."""
    import mlflow
    import yaml

    from lethe.registry import version_metrics
    from lethe.tracking import connect

    reference = target.removeprefix("models:/")
    name, _, alias = reference.partition("@")
    if not name or not alias:
        raise LetheError(f"{target}: expected champion, a variant, or models:/<name>@<alias>")
    uri = connect(params.tracking)
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        raise LetheError(f"models:/{name}@{alias}: no such registered model or alias in {uri}; run `lethe register` "
                         "or check the name")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file of lethe's code copy
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(downloads)))
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    config = pyfunc["config"]  # lethe.pyfunc's model_config: the sampler the version was registered with
    return Source(version.tags.get("method", name), folder / pyfunc["artifacts"]["model"]["path"],
                  SampleConfig(**config["sample"]), DiffusionConfig(**config["diffusion"]),
                  {"model": name, "version": str(version.version), "alias": alias, "metrics": version_metrics(version)})


def trained_lora(variant: str, fuse: bool):
    """MemControl's chosen mask where it trained a LoRA to be written apart (not with --fuse); else None."""
    from lethe.training.peft_masks import Mask

    if fuse or variant != "memcontrol":
        return None
    if not CHOSEN_MASK.exists() or not (PRETRAINED / "weights.safetensors").exists():
        raise LetheError(f"memcontrol: its LoRA is recovered against {PRETRAINED} with the mask in {CHOSEN_MASK}, and "
                         "one is missing; run their stages, or pass --fuse to export the fused weights alone")
    chosen = json.loads(CHOSEN_MASK.read_text())
    if chosen["family"] != "lora" or not chosen["blocks"]:
        return None  # the other families live in the weights themselves
    return Mask(chosen["family"], tuple(chosen["blocks"]), chosen["lora_rank"], chosen["lora_alpha"])


def export(params: Params, target: str, to: str, fuse: bool = False, params_file: str = "params.yaml") -> dict:
    import diffusers

    from lethe.export import LORA_FILE, PIPELINE_FILE, RECORD, recovered_lora, refusal, save_pipeline, stock_rewrites
    from lethe.models.diffusion_model import build_scheduler, load_model
    from lethe.sampling import sampling_scheduler
    from lethe.tracking import git_commit

    destination = Path(to)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise LetheError(f"{destination}: already exists and is not empty; choose a new --to")
    with contextlib.ExitStack() as stack:
        if target == "champion" or target.startswith("models:/"):
            downloads = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lethe-export-")))
            uri = f"models:/{params.registry.model_name}@champion" if target == "champion" else target
            source = registry_source(params, uri, downloads)
        elif target in VARIANTS:
            source = Source(target, model_dir(target), params.sample, params.diffusion)
        else:
            raise LetheError(f"{target}: not a variant, champion or models:/<name>@<alias> (variants: {', '.join(VARIANTS)})")
        model = load_model(source.model_dir)
        why = refusal(model, source.variant)
        if why:
            raise LetheError(why)
        mask = trained_lora(source.variant, fuse)
        unet = lora = None
        if mask is not None:
            unet = load_model(PRETRAINED).unet
            try:
                lora = recovered_lora(model.unet, unet, mask)
            except ValueError as exc:
                raise LetheError(f"memcontrol: no LoRA of rank {mask.lora_rank} on {PRETRAINED} gives these weights "
                                 f"({exc}); pass --fuse to export the fused weights")
        scheduler = sampling_scheduler(build_scheduler(model, source.diffusion), source.sample.steps)
        record = {
            "variant": source.variant,
            "registry": source.registry or None,
            "params_sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest(),
            "git_commit": git_commit(),
            "diffusers_version": diffusers.__version__,
            "sampling": {"scheduler": type(scheduler).__name__, "num_inference_steps": source.sample.steps,
                         "guidance_scale": source.sample.guidance_scale, "precision": source.sample.precision},
            "mitigations": model.spec.inference,
            # pipeline.py: the class to load with (DiffusionPipeline, trust_remote_code=True), and why
            "pipeline": PIPELINE_FILE if model.spec.inference or stock_rewrites(scheduler) else None,
            "scheduler_kept": stock_rewrites(scheduler),
            "lora": LORA_FILE if lora is not None else None,
            "fused": bool(fuse and source.variant == "memcontrol"),
        }
        with atomic_dir(destination) as tmp:
            save_pipeline(model, scheduler, tmp, unet=unet, lora=lora)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if source.registry:
        import mlflow

        client = mlflow.MlflowClient()
        client.set_model_version_tag(source.registry["model"], source.registry["version"], "export/path",
                                     str(destination.resolve()))
        client.set_model_version_tag(source.registry["model"], source.registry["version"], "export/diffusers_version",
                                     diffusers.__version__)
    return {"exported": str(destination), **record}
