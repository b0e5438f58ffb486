"""Where a step sits against this CPU's limit: its FLOPs, its achieved rate, the machine's fp32 GEMM rate
measured in the same run on the same threads, and the operators the time goes to.

`roofline(step, threads)` is shared by train_step.py (one fine-tune step: forward, backward, AdamW) and
sampling.py (one guided U-Net call). FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`
(matmuls and convolutions: what the GEMM rate bounds; normalization and elementwise work count 0 there and
show up in the operator table instead). The GEMM reference is a square fp32 matmul large enough to run at
the BLAS library's peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

GEMM_SIZE = 2048


def gemm_gflops(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate on `threads` threads (the best of `repeats`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # allocation, BLAS start-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of `step` (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def seconds_per_step(step: Callable[[], None], threads: int, steps: int, warmup: int) -> float:
    """The median seconds of `step` on `threads` threads, after `warmup` untimed calls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    torch.set_num_threads(previous)
    return statistics.median(times)


def operator_table(step: Callable[[], None], threads: int, top: int = 8) -> list[dict]:
    """The operators `step` spends its CPU time in (self time, the largest first), from torch's profiler."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    torch.set_num_threads(previous)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]]


def roofline(step: Callable[[], None], threads: list[int], steps: int = 10, warmup: int = 3) -> dict:
    """The step's FLOPs, and per thread count its seconds, achieved GFLOP/s, the GEMM rate and their ratio;
    the 2-thread over 1-thread speed-up; the operators the time goes to at the most threads."""
    flops = step_flops(step)
    out: dict = {"step_gflop": round(flops / 1e9, 3), "gemm_size": GEMM_SIZE}
    rates = {}
    for n in threads:
        seconds = seconds_per_step(step, n, steps, warmup)
        achieved, gemm = flops / seconds / 1e9, gemm_gflops(n)
        rates[n] = achieved
        out[f"threads_{n}"] = {"seconds_per_step": round(seconds, 4), "achieved_gflops": round(achieved, 2),
                               "gemm_gflops": round(gemm, 2), "of_gemm": round(achieved / gemm, 3)}
    if len(threads) > 1:
        out["thread_speedup"] = round(rates[max(threads)] / rates[min(threads)], 3)
    out["operators"] = operator_table(step, max(threads))
    return out
