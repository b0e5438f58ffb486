"""Stable Diffusion scale: the stable-diffusion preset's training and sampling on one GPU.

The model has Stable Diffusion 1.5's shapes, built from its configs with random weights (no checkpoint can
be downloaded; `lethe.models.random_sd`), and trains on a small generated image folder at 512 px through
lethe's own path: prepare, cached VAE latents, `DiffusionTraining` under Lightning with the preset's
bf16-mixed precision and gradient checkpointing, then one batch of generations with `lethe.sampling.generate`
(the preset's 50 DDIM steps, guidance 7.5). Prints one JSON object: training steps per second, peak GPU
memory in training and in sampling, seconds per generated image. Without a GPU it prints
{"skipped": ...} and exits 0. `--tiny --device cpu` runs the same code at toy size (the tests do).

    python benchmarks/sd_scale.py [--steps 200] [--batch-size 8] [--images 64] [--generations 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PRESET = Path(__file__).resolve().parents[1] / "pipelines" / "stable-diffusion" / "params.yaml"


def step_timer(warmup: int):
    """A callback taking the wall time of the steps after the first `warmup` (autotuning, allocation)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.start = self.end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize()
            self.end = time.perf_counter()

    return StepTimer()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def preset_params(work: Path, args, device: str):
    from lethe.config import Params

    raw = yaml.safe_load(PRESET.read_text())
    raw["data"] |= {"folder": str(work / "images"), "resolution": args.resolution, "target_size": args.images // 2,
                    "holdout_size": max(2, args.images // 8), "tune_size": max(2, args.images // 8)}
    raw["model"]["pretrained_path"] = str(work / "sd")
    train = {"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": 10**9, "devices": 1,
             "strategy": "auto", "accelerator": "gpu" if device == "cuda" else "cpu"}
    raw["finetune"] |= train
    raw["sample"] |= {"batch_size": args.generations}
    if args.sample_steps:
        raw["sample"]["steps"] = args.sample_steps
    return Params.model_validate(raw)


def run(args) -> dict:
    from lethe.data.latents import cached_latents
    from lethe.data.sources import prepare
    from lethe.models.diffusion_model import build_model, build_scheduler
    from lethe.models.random_sd import build_random_sd, write_image_folder
    from lethe.sampling import generate
    from lethe.training.fit import CaptionedImages, fit
    from lethe.training.module import DiffusionTraining

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        write_image_folder(work / "images", args.images, args.resolution)
        build_random_sd(work / "sd", args.resolution, size="tiny" if args.tiny else "sd15")
        params = preset_params(work, args, device.type)
        cfg = params.finetune
        data = prepare(params.data)
        model = build_model(params.model, params.data.resolution, params.data.channels)
        scheduler = build_scheduler(model, params.diffusion)
        latents = cached_latents(model, data, "sd-scale", device, cache=work / "latents")
        records = data.training_records("target")
        dataset = CaptionedImages(data, records, model.text_encoder.tokenize, latents=latents)
        setup_seconds = time.perf_counter() - started

        warmup = min(args.warmup, cfg.steps - 1)
        timer = step_timer(warmup)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        fit(DiffusionTraining(model, scheduler, cfg), dataset, cfg, work / "checkpoints", callbacks=[timer])
        train_peak = peak_memory_gib()
        steps_per_second = (cfg.steps - warmup) / (timer.end - timer.start)

        model.to(device)
        prompts = [r.caption for r in records][: args.generations]
        generate(model, scheduler, prompts[:1], [0], params.sample)  # warm-up: kernels, allocator
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        started = time.perf_counter()
        images = generate(model, scheduler, prompts, list(range(len(prompts))), params.sample)
        synchronize()
        seconds_per_image = (time.perf_counter() - started) / len(images)
    return {
        "benchmark": "sd_scale",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": "tiny" if args.tiny else "sd15",
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "resolution": args.resolution,
        "precision": cfg.precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "batch_size": cfg.batch_size,
        "timed_steps": cfg.steps - warmup,
        "train_steps_per_s": round(steps_per_second, 3),
        "train_images_per_s": round(steps_per_second * cfg.batch_size, 2),
        "train_peak_memory_gib": train_peak,
        "sample_steps": params.sample.steps,
        "guidance_scale": params.sample.guidance_scale,
        "generations": len(images),
        "seconds_per_image": round(seconds_per_image, 3),
        "sample_peak_memory_gib": peak_memory_gib(),
        "setup_seconds": round(setup_seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="images in the generated folder")
    parser.add_argument("--generations", type=int, default=8, help="images in the timed batch of generations")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the preset's)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="toy-sized model: checks the code path, measures nothing")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "sd_scale", "skipped": "no CUDA device (pass --tiny --device cpu to check the code path)"}))
        return 0
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
