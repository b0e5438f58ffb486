"""Levers on the step's speed, each measured against the same run's unchanged step.

One fine-tune step (forward, per-sample loss, backward, AdamW) and one guided sampling call (both branches
in one batch) of the embedded default, as the pipeline runs them, against the same step with one lever
pulled. Rounds alternate between the unchanged step and every lever, so drift on a shared machine hits
all of them; each figure is the median seconds over the rounds. Prints one JSON object: per lever its
seconds, its speed ratio against the unchanged step (> 1 is faster), its one-off cost (compilation) and
how far its output moves from the unchanged step's (the largest absolute difference of the loss, or of
the predicted noise); and the roofline of the unchanged step and call (`roofline.py`).

Levers:
- `channels_last`: the U-Net and its input in channels-last memory format (oneDNN's preferred layout);
- `compile`: `torch.compile` with inductor's CPU backend (fusing normalization and activation into the
  kernels around them); its first calls compile, the one-off cost, into an empty cache;
- `bf16_autocast`: `torch.autocast("cpu", torch.bfloat16)` (this CPU's avx512_bf16);
- `math_attention`: diffusers' `AttnProcessor` (explicit matmuls and softmax) instead of PyTorch's fused
  scaled-dot-product attention, which at a few channels per head runs far below the GEMM rate;
- `jit_freeze` (sampling only): `torch.jit.trace` + `torch.jit.freeze`, oneDNN's inference fusions
  (`optimize_for_inference`).

Threads are the other lever: `benchmarks/parallel.py` measures two stages side by side against one after
another; the roofline (train_step.py) gives the 2-thread speed-up of one step.

    python benchmarks/levers.py [--rounds 5] [--steps 8] [--threads 1 2] [--only train|sample] [--levers ...] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
from diffusers.models.attention_processor import AttnProcessor

from lethe.config import Params
from lethe.data.sources import prepare
from lethe.evaluation.provenance import machine
from lethe.models.diffusion_model import build_model, build_scheduler
from lethe.models.text import corpus_vocabulary
from lethe.training.fit import CaptionedImages, training_loader
from lethe.training.module import DiffusionTraining

from roofline import roofline  # benchmarks/ is the script's folder, so on sys.path


TRAIN_LEVERS = ("today", "channels_last", "compile", "bf16_autocast", "math_attention")
SAMPLE_LEVERS = (*TRAIN_LEVERS, "jit_freeze")


def seconds(run, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - started) / steps


def train_variants(initial, scheduler, cfg, batch, levers: list[str]) -> dict:
    """name -> (a step function, a function giving the step's loss on fixed noise, the one-off seconds)."""

    def make(lever: str):
        module = DiffusionTraining(copy.deepcopy(initial), scheduler, cfg)
        optimizer = module.configure_optimizers()["optimizer"]
        unet = module.model.unet
        autocast = lever == "bf16_autocast"
        if lever == "channels_last":
            unet.to(memory_format=torch.channels_last)
            batch_used = dict(batch, images=batch["images"].contiguous(memory_format=torch.channels_last))
        else:
            batch_used = batch
        if lever == "compile":
            module.model.unet = torch.compile(unet)
        if lever == "math_attention":
            unet.set_attn_processor(AttnProcessor())

        def loss():
            torch.manual_seed(0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return module.per_sample_loss(batch_used)[0].mean()

        def step():
            value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()

        started = time.perf_counter()
        first = loss().detach()  # on the shared initial weights: the lever's own change, before any step
        step()  # compiles forward and backward where the lever compiles
        return step, lambda: first, time.perf_counter() - started

    return {lever: make(lever) for lever in ["today", *levers] if lever in TRAIN_LEVERS}


def sample_variants(initial, batch_size: int, levers: list[str]) -> dict:
    model = copy.deepcopy(initial).eval()
    unet = model.unet
    tokens = model.text_encoder.tokenize(["a handwritten digit"] * batch_size)
    with torch.no_grad():
        context = model.encode_text(tokens)
        context = torch.cat([context, context])
    torch.manual_seed(0)
    x = torch.randn(2 * batch_size, *model.sample_shape)
    t = torch.tensor(500)

    def make(lever: str):
        net, x_used, autocast = unet, x, lever == "bf16_autocast"
        started = time.perf_counter()
        if lever == "channels_last":
            net = copy.deepcopy(unet).to(memory_format=torch.channels_last)
            x_used = x.contiguous(memory_format=torch.channels_last)
        if lever == "compile":
            net = torch.compile(copy.deepcopy(unet))
        if lever == "math_attention":
            net = copy.deepcopy(unet)
            net.set_attn_processor(AttnProcessor())
        if lever == "jit_freeze":
            wrapper = _Plain(copy.deepcopy(unet)).eval()
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, (x, t, context), check_trace=False)
                net = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

        @torch.no_grad()
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if lever == "jit_freeze":
                    return net(x_used, t, context).float()
                return net(x_used, t, encoder_hidden_states=context).sample.float()

        call()
        return call, call, time.perf_counter() - started

    return {lever: make(lever) for lever in ["today", *levers] if lever in SAMPLE_LEVERS}


class _Plain(torch.nn.Module):
    """The U-Net as a function of tensors alone, for torch.jit.trace."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def compare(variants: dict, rounds: int, steps: int) -> dict:
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (step, _, _) in variants.items():
            times[name].append(seconds(step, steps))
    reference_out = variants["today"][1]().detach().float()
    out = {}
    today = statistics.median(times["today"])
    for name, (step, output, one_off) in variants.items():
        median = statistics.median(times[name])
        out[name] = {"seconds": round(median, 4), "speed_vs_today": round(today / median, 3),
                     "one_off_seconds": round(one_off, 1),
                     "max_abs_diff": float((output().detach().float() - reference_out).abs().max())}
    return out


# what became of each lever, and why (the figures beside it are the run's own)
DECISIONS = {
    "channels_last": ("no", "a few percent either way from run to run: inside the noise"),
    "compile": ("no", "little on the fine-tune step, for a first compile (the one-off, with an empty cache) that "
                "each method's model pays for its own graph, and a C++ compiler on the user's machine"),
    "bf16_autocast": ("an option", "the fine-tune step runs slower; the sampling call runs faster, its predicted noise "
                      "moved by a few hundredths: `sample.precision: bf16-mixed`, off by default because every "
                      "calibrated threshold and the re-run table were measured on float32 generations"),
    "math_attention": ("no", "diffusers' classic processor (batched matmuls and a softmax) instead of the fused "
                       "kernel: at one thread, each stage's share under `lethe repro`, no faster on the fine-tune "
                       "step and slower on sampling; attention's tiny heads are slow either way"),
    "jit_freeze": ("no", "oneDNN's inference fusions through TorchScript: no faster than the eager U-Net"),
}


def markdown(result: dict) -> str:
    threads = result["threads"]
    head = ["lever"] + [f"{part} ({n} thread{'s' if n > 1 else ''})" for part in ("fine-tune step", "sampling call")
                        for n in threads] + ["one-off s", "largest output change", "kept", "why"]
    lines = ["# Levers on the step's speed", "",
             "Written by `python benchmarks/levers.py --markdown > docs/levers.md` on an idle machine "
             f"({result['machine']}; {result['rounds']} alternating rounds of "
             f"{result['steps_per_round']} calls). Each figure is the speed against the same run's unchanged "
             f"call (above 1: faster): one fine-tune step of the embedded default (batch {result['fine_tune_batch']}: "
             "forward, loss, backward, AdamW) and one guided sampling call (both branches, batch "
             f"{result['sampling_batch']}). The sections after the table place today's calls against this CPU's fp32 "
             "GEMM rate, measured in the same run (`benchmarks/roofline.py`, also printed by train_step.py and "
             "sampling.py): the operators that stay below it are what a faster step would need. "
             "Threads are the lever kept: `lethe repro` runs two stages side by side with one thread each "
             "(`python benchmarks/parallel.py` measures it against one after another with two).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lever in SAMPLE_LEVERS:
        figures = [result[str(n)][part][lever] for n in threads for part in ("train_step", "sampling_call")
                   if lever in result[str(n)].get(part, {})]
        if not figures:
            continue  # not asked for (--levers)
        cells = [lever]
        for part in ("train_step", "sampling_call"):
            for n in threads:
                figure = result[str(n)].get(part, {}).get(lever)
                cells.append(f"{figure['speed_vs_today']:.2f}x" if figure else "n/a")
        cells.append(f"{max(f['one_off_seconds'] for f in figures):.1f}")
        cells.append(f"{max(f['max_abs_diff'] for f in figures):.2g}")
        cells += list(DECISIONS.get(lever, ("(today's step)", "the reference every ratio is against")))
        lines.append("| " + " | ".join(cells) + " |")
    for part, title in (("train_step", "fine-tune step"), ("sampling_call", "sampling call")):
        line = result.get("roofline", {}).get(part)
        if not line:
            continue
        rates = "; ".join(f"{n} thread{'s' if n > 1 else ''}: {line[f'threads_{n}']['achieved_gflops']:.1f} GFLOP/s, "
                          f"{line[f'threads_{n}']['of_gemm']:.2f} of the GEMM rate ({line[f'threads_{n}']['gemm_gflops']:.0f})"
                          for n in threads)
        lines += ["", f"## Today's {title} against the limit", "",
                  f"{line['step_gflop']:.1f} GFLOP a call (matmuls, convolutions and attention); {rates}. Its "
                  f"operators that carry FLOPs, at {max(threads)} threads, the furthest below the limit first (each "
                  "operator's time includes what it calls; the rest of the step is normalization, elementwise work "
                  "and copies, which count no FLOPs):", "",
                  "| operator | GFLOP | share of the call's time | GFLOP/s | of GEMM |", "|---|---|---|---|---|"]
        lines += [f"| `{row['op']}` | {row['gflop']:.2f} | {row['share_of_step']:.2f} | {row['achieved_gflops']:.1f} | "
                  f"{row['of_gemm']:.2f} |" for row in line["flop_operators"]]
    if "attention" in result:
        lines += ["", f"The U-Net's attention: {result['attention']}. A kernel reaches the GEMM rate on large tiles; "
                  "attention this narrow spends its time on softmax and memory traffic, and would need fewer, wider "
                  "heads (a U-Net shape, judged by what it does to memorization, not by speed alone)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", choices=["train", "sample"], default=None)
    parser.add_argument("--levers", nargs="+", choices=SAMPLE_LEVERS[1:], default=list(SAMPLE_LEVERS[1:]))
    parser.add_argument("--markdown", action="store_true", help="a markdown table (docs/levers.md) instead of JSON")
    args = parser.parse_args()
    # an empty inductor cache: the compile lever's one-off is what a stage pays the first time it compiles
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lethe-levers-inductor-")

    params = Params()
    data = prepare(params.data)
    torch.manual_seed(0)
    initial = build_model(params.model, 16, 1, corpus_vocabulary([r.caption for r in data.records]))
    cfg = params.finetune.model_copy(update={"checkpoint_every": 10**9, "train_text_encoder": True})
    scheduler = build_scheduler(initial, params.diffusion)
    dataset = CaptionedImages(data, data.training_records("target"), initial.text_encoder.tokenize)
    batch = next(iter(training_loader(dataset, cfg)))

    result = {"benchmark": "levers", "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
              "machine": machine(), "fine_tune_batch": cfg.batch_size, "sampling_batch": 2 * params.sample.batch_size}
    today = {}
    for n in args.threads:
        torch.set_num_threads(n)
        figures = result[str(n)] = {}
        if args.only in (None, "train"):
            variants = train_variants(initial, scheduler, cfg, batch, args.levers)
            figures["train_step"], today["train_step"] = compare(variants, args.rounds, args.steps), variants["today"][0]
        if args.only in (None, "sample"):
            variants = sample_variants(initial, params.sample.batch_size, args.levers)
            figures["sampling_call"], today["sampling_call"] = compare(variants, args.rounds, args.steps), variants["today"][0]
    # where today's calls sit against this CPU's fp32 GEMM rate, and which operators stay below it
    result["roofline"] = {part: roofline(step, args.threads, steps=5, warmup=1) for part, step in today.items()}
    result["attention"] = "; ".join(sorted({f"{m.heads} heads of {m.inner_dim // m.heads} channels"
                                            for m in initial.unet.modules()
                                            if type(m).__name__ == "Attention"}))
    print(markdown(result) if args.markdown else json.dumps(result))


if __name__ == "__main__":
    main()
