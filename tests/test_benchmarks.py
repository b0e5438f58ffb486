"""The benchmarks' own arithmetic: what the roofline counts as a step's work."""

import importlib.util
from pathlib import Path

import pytest
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


def _ablation_record(lever: str, seed: int, dup: float, half_width: float = 0.0) -> dict:
    """A run's record with every figure 0.5 and a prompt interval of ± half_width, the dup rate as given."""
    figure = lambda v: {"": v, "/ci_low": v - half_width, "/ci_high": v + half_width}
    keys = ["replication/rate/holdout", "replication/reid_rate/dup", "quality/prompt_accuracy/holdout"]
    baseline = {k + s: v for k in keys for s, v in figure(0.5).items()}
    baseline |= {"replication/rate/dup" + s: v for s, v in figure(dup).items()}
    baseline |= {"prompts/dup": 32, "prompts/unique": 40, "prompts/holdout": 40, "cost/train_seconds": 180.0}
    detect = {f"detection/{n}/auroc" + s: v for n in ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim")
              for s, v in figure(0.5).items()} | {"prompts/dup": 32}
    memattn = {f"vs_baseline/{k}/diff" + s: v for k in ("replication_rate_dup", "quality_prompt_accuracy_holdout")
               for s, v in figure(0.0).items()}
    localize = {"nemo/memorized_prompts": 20, "nemo/localized_prompts": 0, "nemo/median_neurons": 30}
    return {"lever": lever, "seed": seed, "commit": "0" * 40, "seconds": 600.0, "baseline": baseline,
            "detect": detect, "localize": localize, "memattn": memattn}


def test_ablation_adds_pooled_training_run_noise_to_a_levers_interval(tmp_path):
    """Worked case: no lever at seeds 0 and 1 gives dup 0.6 and 0.7 with no prompt noise, so s_run = 0.0707
    (df 1) and the mean 0.65 has 0.65 ± t(0.975, 1) x 0.0707 / √2 = 0.65 ± 0.6353. A lever run once at 0.9
    gets 0.9 ± 12.706 x 0.0707 = 0.9 ± 0.8985 (clipped at 1), and its change +0.25 ± 12.706 x 0.0707 x √1.5 (one pooled run part, df 1) is inside the noise."""
    import json

    ablation = benchmark("ablation")
    for lever, seed, dup in (("none", 0, 0.6), ("none", 1, 0.7), ("schedule", 0, 0.9)):
        (tmp_path / f"{lever}-seed{seed}.json").write_text(json.dumps(_ablation_record(lever, seed, dup)))
    result = ablation.table(tmp_path)
    assert result["run_sd"]["dup"]["sd"] == pytest.approx(0.070711, abs=1e-6)
    none, schedule = result["levers"]["none"]["dup"], result["levers"]["schedule"]["dup"]
    assert (none["ci_low"], none["ci_high"]) == pytest.approx((0.65 - 0.63531, 1.0), abs=1e-4)
    assert (schedule["ci_low"], schedule["ci_high"]) == pytest.approx((0.9 - 0.89848, 1.0), abs=1e-4)  # a rate: clipped at 1
    assert schedule["change"] == pytest.approx(0.25) and schedule["change_significant"] == 0
    assert "| SD's scaled-linear schedule | 1 | 0.90 [0.00, 1.00]" in ablation.markdown(result)
