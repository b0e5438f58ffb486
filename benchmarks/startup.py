"""A stage's fixed cost: the seconds a fresh process spends importing its stage module before any work,
beside `python -c "import torch"` in the same run, and `lethe --help`. Prints JSON.

A stage that builds a U-Net cannot start sooner than `import torch` plus diffusers' `UNet2DConditionModel`
(the "diffusers floor": diffusers 0.42 loads torch._dynamo, peft, transformers and every transformer
model on that import); `over_floor` is what such a stage adds to it.

Each figure is the best of `--repeats` fresh processes (the least disturbed by the rest of the machine).
Usage: python benchmarks/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from lethe.cli import STAGES

FLOOR = "import torch; from diffusers import DDIMScheduler, UNet2DConditionModel"


def seconds(command: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


def imports_diffusers(stage: str) -> bool:
    check = f"import sys, lethe.stages.{stage}; sys.exit('diffusers' in sys.modules)"
    return subprocess.run([sys.executable, "-c", check], check=False).returncode == 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    python = [sys.executable, "-c"]
    result = {
        "python": seconds([*python, "pass"], repeats),
        "import torch": seconds([*python, "import torch"], repeats),
        "diffusers floor": seconds([*python, FLOOR], repeats),
        "lethe --help": seconds([sys.executable, "-m", "lethe.cli", "--help"], repeats),
        "stages": {stage: seconds([*python, f"import lethe.stages.{stage}"], repeats) for stage in STAGES},
    }
    result["slowest stage"] = max(result["stages"], key=result["stages"].get)
    result["over_floor"] = {stage: round(t - result["diffusers floor"], 3) for stage, t in result["stages"].items()
                            if imports_diffusers(stage)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
