"""Training throughput: lethe's LightningModule under Lightning's Trainer against a bare PyTorch loop.

Both train the same model from the same initial weights, on the same data loader and batch size, with
the same work per step: per-sample loss, backward, gradient clipping, AdamW with warm-up, EMA. The
runs alternate (Lightning, bare, Lightning, bare, ...) so that drift on a shared machine hits both;
the first steps of each run are left out of the timing. Prints one JSON object. Goal: ratio >= 0.95.

`roofline` places one fine-tune step (forward, backward, AdamW) against this CPU's limit in the same run
(benchmarks/roofline.py): its GFLOP, its achieved GFLOP/s on 1 and 2 threads beside the fp32 GEMM rate on
the same threads, the 2-thread speed-up, and the operators the time goes to.

    python benchmarks/train_step.py [--steps 60] [--warmup 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lethe.config import Params
from lethe.data.sources import prepare
from lethe.models.diffusion_model import build_model, build_scheduler
from lethe.models.text import corpus_vocabulary
from lethe.training.fit import CaptionedImages, fit, training_loader
from lethe.training.module import DiffusionTraining

from roofline import roofline  # benchmarks/ is the script's folder, so on sys.path


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning_run(module, dataset, cfg, warmup) -> float:
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        fit(module, dataset, cfg, Path(tmp), callbacks=[timer])
    return (cfg.steps - warmup) * cfg.batch_size / (timer.end - timer.start)


def bare_run(module, dataset, cfg, warmup) -> float:
    torch.manual_seed(cfg.seed)
    optimizer, schedule = (lambda c: (c["optimizer"], c["lr_scheduler"]["scheduler"]))(module.configure_optimizers())
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
    module.train()
    start = None
    for step, batch in enumerate(training_loader(dataset, cfg)):
        if step == warmup:
            start = time.perf_counter()
        loss = module.per_sample_loss(batch)[0].mean()
        module.check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update_parameters(module)
    return (cfg.steps - warmup) * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    params = Params()
    data = prepare(params.data)
    torch.manual_seed(0)
    initial = build_model(params.model, 16, 1, corpus_vocabulary([r.caption for r in data.records]))
    # checkpoints are left out of both: a bare loop would pay for them too
    cfg = params.finetune.model_copy(update={"steps": args.steps, "checkpoint_every": 10**9, "train_text_encoder": True})
    scheduler = build_scheduler(initial, params.diffusion)
    dataset = CaptionedImages(data, data.training_records("target"), initial.text_encoder.tokenize)

    lightning, bare = [], []
    for _ in range(args.repeats):
        lightning.append(lightning_run(DiffusionTraining(copy.deepcopy(initial), scheduler, cfg), dataset, cfg, args.warmup))
        bare.append(bare_run(DiffusionTraining(copy.deepcopy(initial), scheduler, cfg), dataset, cfg, args.warmup))
    module = DiffusionTraining(copy.deepcopy(initial), scheduler, cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = next(iter(training_loader(dataset, cfg)))

    def one_step():
        loss = module.per_sample_loss(batch)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = {
        "benchmark": "train_step",
        "roofline": roofline(one_step, [1, 2]),
        "batch_size": cfg.batch_size,
        "timed_steps": args.steps - args.warmup,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "lightning_images_per_s": round(statistics.median(lightning), 2),
        "bare_images_per_s": round(statistics.median(bare), 2),
        "ratio": round(statistics.median(lightning) / statistics.median(bare), 3),
        "goal_ratio": 0.95,
        "runs": {"lightning": [round(x, 2) for x in lightning], "bare": [round(x, 2) for x in bare]},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
