"""Progress a person can see: tqdm's bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with carriage returns, which a log (`dvc repro > log`) keeps as one endless line;
when stderr is not a terminal each redraw becomes its own line instead, at most one per `LOG_INTERVAL`.

A bar's updates are also the heartbeat of every long loop, so they follow `lethe repro`'s share of the
cores: under it, a stage running beside another uses one thread and takes both once it runs alone
(`CORES_FILE` names the file that says how many; see `lethe.repro`).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between progress lines in a log
CORES_FILE = "LETHE_CORES_FILE"  # environment variable: the file holding this stage's share of the cores
FOLLOW_INTERVAL = 2.0  # seconds between reads of that file
_last_follow = [float("-inf")]


def follow_core_share() -> None:
    """Set torch's threads to the share `lethe repro` gives this stage now, at most every FOLLOW_INTERVAL."""
    path, torch = os.environ.get(CORES_FILE), sys.modules.get("torch")
    if not path or torch is None or time.monotonic() - _last_follow[0] < FOLLOW_INTERVAL:
        return
    _last_follow[0] = time.monotonic()
    try:
        with open(path) as file:
            share = int(file.read())
    except (OSError, ValueError):
        return
    if share >= 1 and share != torch.get_num_threads():
        torch.set_num_threads(share)


class _Bar(tqdm):
    def update(self, n: float = 1) -> bool | None:
        follow_core_share()
        return super().update(n)

    def __iter__(self):
        for item in super().__iter__():
            follow_core_share()
            yield item


class _Lines:
    """A file for tqdm that writes each redraw of the bar as one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand), on stderr."""
    terminal = sys.stderr.isatty()
    return _Bar(iterable, total=total, desc=desc, unit=unit, file=sys.stderr if terminal else _Lines(sys.stderr),
                mininterval=0.5 if terminal else LOG_INTERVAL, ascii=not terminal, dynamic_ncols=terminal)
