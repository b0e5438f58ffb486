"""Progress a person can see: tqdm's bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with carriage returns, which a log (`dvc repro > log`) keeps as one endless line;
when stderr is not a terminal each redraw becomes its own line instead, at most one per `LOG_INTERVAL`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between progress lines in a log


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
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr if terminal else _Lines(sys.stderr),
                mininterval=0.5 if terminal else LOG_INTERVAL, ascii=not terminal, dynamic_ncols=terminal)
