"""Two independent stages on a 2-core machine: one after another with two threads each (what `dvc repro`
does), or side by side with one thread each. Prints JSON: the wall-clock seconds of both ways and the
speed-up, for two fine-tunes and for two samplings.

Each job is a fresh process, as a stage is, so its imports count: a fine-tune is `--steps` Lightning steps
of the embedded default's model (lethe's `fit`, batch 32), a sampling is `--images` generations with
lethe's `generate` (25 DDIM steps, guided). Models have random weights: the cost does not depend on them.

    python benchmarks/parallel.py [--steps 100] [--images 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def job(kind: str, steps: int, images: int) -> None:
    import tempfile
    from pathlib import Path

    import torch

    from lethe.config import load_params
    from lethe.data.sources import prepare
    from lethe.models.diffusion_model import build_model, build_scheduler
    from lethe.models.text import corpus_vocabulary

    params = load_params("params.yaml")
    data = prepare(params.data)
    torch.manual_seed(0)
    model = build_model(params.model, 16, 1, corpus_vocabulary([r.caption for r in data.records]))
    scheduler = build_scheduler(model, params.diffusion)
    if kind == "train":
        from lethe.training.fit import CaptionedImages, fit
        from lethe.training.module import DiffusionTraining

        cfg = params.finetune.model_copy(update={"steps": steps, "checkpoint_every": 10**9})
        dataset = CaptionedImages(data, data.training_records("target"), model.text_encoder.tokenize)
        with tempfile.TemporaryDirectory() as tmp:
            fit(DiffusionTraining(model, scheduler, cfg), dataset, cfg, Path(tmp))
    else:
        from lethe.sampling import generate

        captions = [r.caption for r in data.records]
        generate(model, scheduler, [captions[i % len(captions)] for i in range(images)], list(range(images)), params.sample)


def timed(commands: list[list[str]], threads: int, side_by_side: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    if side_by_side:
        running = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
        if any(p.wait() for p in running):
            raise SystemExit("a job failed")
    else:
        for c in commands:
            subprocess.run(c, env=env, check=True, capture_output=True)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--job", choices=("train", "sample"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return job(args.job, args.steps, args.images)
    result = {"benchmark": "parallel", "cpus": os.cpu_count(), "steps": args.steps, "images": args.images}
    for kind in ("train", "sample"):
        command = [sys.executable, __file__, "--job", kind, "--steps", str(args.steps), "--images", str(args.images)]
        serial = timed([command, command], threads=2, side_by_side=False)
        parallel = timed([command, command], threads=1, side_by_side=True)
        result[kind] = {"one_after_another_2_threads_s": serial, "side_by_side_1_thread_s": parallel,
                        "speedup": round(serial / parallel, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
