"""Sampling with cross-attention capture on (what `detect` uses) against diffusers' own processors.

The same model, prompts, seeds and DDIM steps, three ways, interleaved over several repeats so a
busy machine affects them alike: diffusers' default `AttnProcessor2_0` (the reference), lethe's
processors with nothing asked (the fast path every sampler takes), and lethe's processors capturing
every layer's map at every step plus Wen's magnitudes (a `SamplingTrace`). Prints one JSON object
with the median seconds and the capture overhead. Goal: overhead <= 5%.

    python benchmarks/attention_capture.py [--prompts 64] [--steps 25] [--repeats 5] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


def main() -> None:
    from lethe.config import load_params
    from lethe.memorization.attention import attention_control
    from lethe.models.diffusion_model import build_model, build_scheduler
    from lethe.models.text import corpus_vocabulary
    from lethe.sampling import SamplingTrace, generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = load_params(args.params)
    prompts = [f"a bold handwritten {w} from a ledger" for w in ("one", "two", "three", "four")] * (args.prompts // 4)
    model = build_model(params.model, params.data.resolution, params.data.channels, corpus_vocabulary(prompts))
    scheduler = build_scheduler(model, params.diffusion)
    cfg = params.sample.model_copy(update={"steps": args.steps})
    seeds = list(range(len(prompts)))

    def reference():
        model.unet.set_attn_processor(AttnProcessor2_0())
        return generate(model, scheduler, prompts, seeds, cfg)

    def lethe_plain():
        attention_control(model)  # lethe's processors, nothing asked of them
        return generate(model, scheduler, prompts, seeds, cfg)

    def lethe_capture():
        return generate(model, scheduler, prompts, seeds, cfg, SamplingTrace())

    runs = {"diffusers_default": reference, "lethe_no_capture": lethe_plain, "lethe_capture": lethe_capture}
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "images": len(prompts), "steps": args.steps, "repeats": args.repeats,
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "capture_overhead_vs_diffusers": round(median["lethe_capture"] / median["diffusers_default"] - 1, 4),
        "capture_overhead_vs_no_capture": round(median["lethe_capture"] / median["lethe_no_capture"] - 1, 4),
        # explicit softmax against the fused kernel: float rounding only, carried through the steps
        "max_abs_image_difference": float((outputs["lethe_capture"] - outputs["diffusers_default"]).abs().max()),
        "goal": "capture_overhead_vs_diffusers <= 0.05",
    }, indent=2))


if __name__ == "__main__":
    main()
