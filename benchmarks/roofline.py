"""Where a step sits against this CPU's limit: its FLOPs, its achieved rate, the machine's fp32 GEMM rate
measured in the same run on the same threads, and the operators the time goes to.

`roofline(step, threads)` is shared by train_step.py (one fine-tune step: forward, backward, AdamW) and
sampling.py (one guided U-Net call). FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions and attention, with a formula added for the CPU's flash attention: what the GEMM rate
bounds; normalization and elementwise work count 0 there and show up in the operator table instead).
`flop_operators` places each FLOP-carrying operator against the GEMM rate: what stays below the limit. The GEMM reference is a square fp32 matmul large enough to run at
the BLAS library's peak.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

GEMM_SIZE = 2048


@contextlib.contextmanager
def threads_set(n: int):
    """torch on `n` threads inside the block, its previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gemm_gflops(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate on `threads` threads (the best of `repeats`)."""
    with threads_set(threads):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # allocation, BLAS start-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


aten = torch.ops.aten
# On a CPU, scaled_dot_product_attention runs as `_scaled_dot_product_flash_attention_for_cpu`, which torch's
# counter has no formula for: without these its FLOPs (a fifth of the step's time) would count as zero.
def _as_registered(op):
    """The counter's formula for `op`, marked as already taking tensors (the counter would wrap it again)."""
    def formula(*args, **kwargs):
        return flop_registry[op](*args, **kwargs)

    formula._get_raw = True
    return formula


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _as_registered(aten._scaled_dot_product_flash_attention),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        _as_registered(aten._scaled_dot_product_flash_attention_backward),
}


def counted_flops(step: Callable[[], None]) -> dict[str, int]:
    """FLOPs of one call of `step` per operator (`aten::mm`, ...): matmuls, convolutions and attention,
    forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        step()
    return {f"aten::{op.__name__}": flops for op, flops in counter.get_flop_counts()["Global"].items() if flops}


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of `step` (matmuls, convolutions and attention, forward and backward)."""
    return sum(counted_flops(step).values())


def seconds_per_step(step: Callable[[], None], threads: int, steps: int, warmup: int) -> float:
    """The median seconds of `step` on `threads` threads, after `warmup` untimed calls."""
    with threads_set(threads):
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def operator_table(step: Callable[[], None], threads: int, top: int = 8) -> list[dict]:
    """The operators `step` spends its CPU time in (self time, the largest first), from torch's profiler."""
    with threads_set(threads):
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]]


def operator_roofline(step: Callable[[], None], flops: dict[str, int], threads: int, gemm: float,
                      steps: int = 3) -> list[dict]:
    """Each FLOP-carrying operator of `step` (`flops`: `counted_flops(step)`) against the GEMM rate: its GFLOP
    per step, its time (the operator's whole time, what it calls included), its achieved GFLOP/s and their
    ratio to `gemm`, and its share of the step's time; the slowest against the limit first."""
    with threads_set(threads):
        step()
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                step()
        wall = (time.perf_counter() - started) / steps
    seconds = {e.key: e.cpu_time_total / 1e6 / steps for e in profiler.key_averages() if e.key in flops}
    rows = []
    for op, count in flops.items():
        if seconds.get(op):
            rate = count / seconds[op] / 1e9
            rows.append({"op": op, "gflop": round(count / 1e9, 3), "seconds": round(seconds[op], 4),
                         "achieved_gflops": round(rate, 1), "of_gemm": round(rate / gemm, 3),
                         "share_of_step": round(seconds[op] / wall, 3)})
    return sorted(rows, key=lambda row: row["of_gemm"])


def roofline(step: Callable[[], None], threads: list[int], steps: int = 10, warmup: int = 3) -> dict:
    """The step's FLOPs, and per thread count its seconds, achieved GFLOP/s, the GEMM rate and their ratio;
    the 2-thread over 1-thread speed-up; the operators the time goes to at the most threads."""
    counts = counted_flops(step)
    flops = sum(counts.values())
    out: dict = {"step_gflop": round(flops / 1e9, 3), "gemm_size": GEMM_SIZE}
    rates, gemms = {}, {}
    for n in threads:
        seconds = seconds_per_step(step, n, steps, warmup)
        achieved, gemm = flops / seconds / 1e9, gemm_gflops(n)
        rates[n], gemms[n] = achieved, gemm
        out[f"threads_{n}"] = {"seconds_per_step": round(seconds, 4), "achieved_gflops": round(achieved, 2),
                               "gemm_gflops": round(gemm, 2), "of_gemm": round(achieved / gemm, 3)}
    if len(threads) > 1:
        out["thread_speedup"] = round(rates[max(threads)] / rates[min(threads)], 3)
    out["operators"] = operator_table(step, max(threads))
    out["flop_operators"] = operator_roofline(step, counts, max(threads), gemms[max(threads)])
    return out
