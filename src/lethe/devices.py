"""Which process writes, and where inference runs, when a stage runs on several devices or nodes.

Under DDP every process runs the whole stage (Lightning's launcher re-runs the command for the other
local ranks; torchrun, SLURM or a second node start it themselves). Only the main process (global rank
0) opens the MLflow run and writes outputs; the others train their share of each batch and return.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# set by Lightning's launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK) and SLURM (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a distributed run (read before any process group exists)."""
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def inference_device(accelerator: str = "auto") -> torch.device:
    """Where sampling and feature extraction run: this process's GPU when there is one, else the CPU."""
    import torch  # here: the warm start reads RANK_VARIABLES before anything imports torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    return torch.device("cpu")
