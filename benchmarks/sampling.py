"""Sampling throughput: lethe's `generate` against a bare loop over the same U-Net and scheduler.

The bare loop is the least a DDIM sampler with classifier-free guidance can do: the prompts encoded once,
the conditional and unconditional passes in one batched U-Net call, the scheduler's step, nothing else.
lethe's `generate` adds per-prompt seeded noise, inference-time mitigations (none here) and progress.
Both run on the embedded default's model (the trained baseline where `models/baseline` exists, else the
same architecture with random weights: the cost does not depend on the weights), the same prompts, the
same batch size and steps; the runs alternate so that drift on a shared machine hits both. Prints one
JSON object. Goal: ratio >= 0.9. `roofline` places one guided U-Net call (both branches, one batch) against
this CPU's fp32 GEMM rate in the same run (benchmarks/roofline.py), on 1 and 2 threads.

    python benchmarks/sampling.py [--images 256] [--repeats 3]    # from the repository root: params.yaml's `sample`
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lethe.config import Params, load_params
from lethe.data.sources import prepare
from lethe.diffusion import guide
from lethe.models.diffusion_model import build_model, build_scheduler, load_model
from lethe.models.text import corpus_vocabulary
from lethe.sampling import generate, initial_noise, sampling_scheduler

from roofline import roofline  # benchmarks/ is the script's folder, so on sys.path


@torch.no_grad()
def bare_loop(model, train_scheduler, prompts: list[str], seeds: list[int], steps: int, scale: float, batch: int):
    model.eval()
    scheduler = sampling_scheduler(train_scheduler, steps)
    empty = model.encode_text(model.text_encoder.tokenize([""]))
    out = []
    for start in range(0, len(prompts), batch):
        cond = model.encode_text(model.text_encoder.tokenize(prompts[start : start + batch]))
        context = torch.cat([empty.expand_as(cond), cond])
        x = initial_noise(model.sample_shape, seeds[start : start + batch])
        for t in scheduler.timesteps:
            eps_uncond, eps_cond = model.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(guide(eps_uncond, eps_cond, scale), t, x).prev_sample
        out.append(model.decode(x).clamp(-1, 1))
    return torch.cat(out)


def images_per_second(run, images: int) -> float:
    started = time.perf_counter()
    run()
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    params = load_params("params.yaml") if Path("params.yaml").exists() else Params()
    data = prepare(params.data)
    trained = Path("models/baseline")
    if (trained / "weights.safetensors").exists():
        model = load_model(trained)
    else:
        torch.manual_seed(0)
        model = build_model(params.model, 16, 1, corpus_vocabulary([r.caption for r in data.records]))
    scheduler = build_scheduler(model, params.diffusion)
    captions = [r.caption for r in data.records]
    prompts = [captions[i % len(captions)] for i in range(args.images)]
    seeds = list(range(args.images))
    cfg = params.sample

    same = torch.equal(generate(model, scheduler, prompts[:8], seeds[:8], cfg),
                       bare_loop(model, scheduler, prompts[:8], seeds[:8], cfg.steps, cfg.guidance_scale, cfg.batch_size))
    lethe, bare = [], []
    for _ in range(args.repeats):
        lethe.append(images_per_second(lambda: generate(model, scheduler, prompts, seeds, cfg), args.images))
        bare.append(images_per_second(lambda: bare_loop(model, scheduler, prompts, seeds, cfg.steps, cfg.guidance_scale,
                                                        cfg.batch_size), args.images))
    cond = model.encode_text(model.text_encoder.tokenize(prompts[: cfg.batch_size]))
    context = torch.cat([model.encode_text(model.text_encoder.tokenize([""])).expand_as(cond), cond])
    x = initial_noise(model.sample_shape, seeds[: cfg.batch_size])
    t = sampling_scheduler(scheduler, cfg.steps).timesteps[0]

    @torch.no_grad()
    def one_call():
        model.unet(torch.cat([x, x]), t, encoder_hidden_states=context)

    result = {
        "benchmark": "sampling",
        "roofline": roofline(one_call, [1, 2]),
        "model": str(trained) if (trained / "weights.safetensors").exists() else "random weights",
        "images": args.images,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "same_images": same,
        "lethe_images_per_s": round(statistics.median(lethe), 2),
        "bare_images_per_s": round(statistics.median(bare), 2),
        "ratio": round(statistics.median(lethe) / statistics.median(bare), 3),
        "goal_ratio": 0.9,
        "runs": {"lethe": [round(x, 2) for x in lethe], "bare": [round(x, 2) for x in bare]},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
