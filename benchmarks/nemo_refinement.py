"""NeMo localization with candidate neuron sets scored in batches against one at a time (the published way).

On a trained model (default: the pipeline's `models/baseline`), the memorized target prompts are
found as the `localize` stage finds them, then each is localized twice: `batch_size` candidates per
forward pass, and one candidate per pass. Both must find the same neurons; prints one JSON object
with the neurons, the forward passes and the time of each, and the speed-up.

    python benchmarks/nemo_refinement.py [--model models/baseline] [--prompts 5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from lethe.config import load_params
    from lethe.data.prepared import PreparedData
    from lethe.localization.nemo import MemorizationScore, calibrate, encode, localize, value_activations
    from lethe.models.diffusion_model import build_scheduler, load_model
    from lethe.sampling import nemo_step

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/baseline")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    params = load_params(args.params)
    cfg = params.nemo
    data = PreparedData.load("data/prepared")
    model = load_model(args.model)
    scheduler = build_scheduler(model, params.diffusion)
    t, noise = nemo_step(model, scheduler, cfg.seeds)

    stats, tau, target, memorized, _ = calibrate(model, data, t, noise, cfg.holdout_prompts)
    chosen = [target[i] for i in memorized[: args.prompts]]

    results = {}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        found, passes, started = [], 0, time.perf_counter()
        for record in chosen:
            states = encode(model, [record])
            activations = value_activations(model, states)
            z = {layer: v[0] for layer, v in stats.z(activations).items()}
            score = MemorizationScore(model, t, noise, states, tau)
            located = localize(score, z, {k: v[0] for k, v in activations.items()}, tau, cfg.iterations, batch_size)
            found.append(sorted(map(list, located.neurons)) if located is not None else None)
            passes += score.calls
        results[name] = {"seconds": round(time.perf_counter() - started, 3), "forward_passes": passes, "neurons": found}
    print(json.dumps({
        "prompts": len(chosen), "tau_mem": round(tau, 4), "batch_size": args.batch_size,
        "seconds": {k: v["seconds"] for k, v in results.items()},
        "forward_passes": {k: v["forward_passes"] for k, v in results.items()},
        "speedup": round(results["one_at_a_time"]["seconds"] / max(results["batched"]["seconds"], 1e-9), 2),
        "same_neurons": results["batched"]["neurons"] == results["one_at_a_time"]["neurons"],
        "neurons_per_prompt": [len(n) if n is not None else None for n in results["batched"]["neurons"]],
    }, indent=2))


if __name__ == "__main__":
    main()
