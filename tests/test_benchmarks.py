"""The benchmarks' own arithmetic: what the roofline counts as a step's work."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_roofline_counts_attention_on_a_cpu():
    """On a CPU attention runs as `_scaled_dot_product_flash_attention_for_cpu`, which torch's FLOP counter
    has no formula for: it counted zero, a fifth of the step's time with no work against it."""
    roofline = benchmark("roofline")
    batch, heads, length, dim = 4, 2, 64, 32
    q = torch.randn(batch, heads, length, dim, requires_grad=True)
    linear = torch.nn.Linear(dim, dim)

    def step():
        (torch.nn.functional.scaled_dot_product_attention(q, q, q).sum() + linear(q).sum()).backward()

    counted = roofline.counted_flops(step)
    forward = 4 * batch * heads * length * length * dim  # QK^T and AV, a multiply and an add each
    assert counted["aten::_scaled_dot_product_flash_attention_for_cpu"] == forward
    assert counted["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * forward // 2
    assert roofline.step_flops(step) == sum(counted.values()) > forward
