"""A stage's fixed cost: the seconds a fresh process spends importing its stage module before any work,
beside `python -c "import torch"` in the same run, and `lethe --help`. Prints JSON.

A stage that builds a U-Net cannot start sooner than `import torch` plus diffusers' `UNet2DConditionModel`
(the "diffusers floor": diffusers 0.42 loads torch._dynamo, peft, transformers and every transformer
model on that import); `over_floor` is what such a stage adds to it.

`cold` is the fixed cost through the `lethe` command as a stage meets it under `dvc repro` (the default:
a fresh process importing for itself); `warm` the same with LETHE_WARM=1, where a warm server (lethe.warm)
has imported everything and forks the stage. Each stage runs in an empty project, where it stops with a
one-line error at its first read of an input (its first work). `saved per stage` is the median of cold -
warm over the stages, and `saved over the default` that times the default pipeline's stage count
(`dvc stage list`): what the opt-in warm start would save on a whole `dvc repro`.

Each figure is the best of `--repeats` fresh processes (the least disturbed by the rest of the machine).
Usage: python benchmarks/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lethe.cli import STAGES

FLOOR = "import torch; from diffusers import DDIMScheduler, UNet2DConditionModel"


def seconds(command: list[str], repeats: int, check: bool = True, **kwargs) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=check, capture_output=True, **kwargs)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


# a stage's command with its arguments; each stops at its first input in an empty project (prepare, which
# has none, is left out: it does its work)
COMMANDS = {"shard": [], "pretrain": [], "train": ["baseline"], "featurizer": [], "calibrate": [],
            "evaluate": ["baseline"], "detect": [], "mitigate": ["memattn"], "localize": [], "memcontrol": [],
            "select_loyal": [], "report": [], "register": [], "audit": ["baseline"]}


def through_cli(repeats: int) -> dict[str, dict[str, float]]:
    """Each stage's command to its first work: started warm, and cold."""
    import tempfile

    from lethe.warm import log_path, socket_path, start_server

    lethe = str(Path(sys.executable).parent / "lethe")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text("{}\n")
        server = start_server(600.0, socket_path(project))
        log = log_path(socket_path(project))
        while "ready" not in (log.read_text() if log.exists() else ""):
            if server.poll() is not None:
                raise SystemExit(f"the warm server exited before it was ready; see {log}")
            time.sleep(0.2)
        out = {}
        for mode, switch in (("warm", "1"), ("cold", "0")):
            env = {**os.environ, "LETHE_WARM": switch}
            out[mode] = {stage: seconds([lethe, stage, *args], repeats, cwd=project, env=env, check=False)
                         for stage, args in COMMANDS.items()}
        server.terminate()
        server.wait()
    return out


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
    result |= {f"{mode} command to first work": times for mode, times in through_cli(repeats).items()}
    result["warm slowest"] = max(result["warm command to first work"].values())
    warm, cold = result["warm command to first work"], result["cold command to first work"]
    saved = float(np.median([cold[s] - warm[s] for s in warm]))
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.split()
    result |= {"saved per stage": round(saved, 3), "default stages": len(listed),
               "saved over the default": round(saved * len(listed), 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
