"""A stage's fixed cost: the seconds a fresh process spends importing its stage module before any work,
beside `python -c "import torch"` in the same run, and `lethe --help`. Prints JSON.

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


def seconds(command: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    python = [sys.executable, "-c"]
    result = {
        "python": seconds([*python, "pass"], repeats),
        "import torch": seconds([*python, "import torch"], repeats),
        "lethe --help": seconds([sys.executable, "-m", "lethe.cli", "--help"], repeats),
        "stages": {stage: seconds([*python, f"import lethe.stages.{stage}"], repeats) for stage in STAGES},
    }
    result["slowest stage"] = max(result["stages"], key=result["stages"].get)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
