"""Atomic outputs and content hashes.

A stage writes into a temporary sibling and renames it into place at the end, so an interrupted stage
never leaves a half-written output that a later stage (or DVC) could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from lethe.errors import LetheError
from lethe.paths import train_metrics_file, variant_metrics_file


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary directory that replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, payload) -> None:
    """JSON with NaN written as null (NaN is not JSON, and DVC's metrics reader refuses it)."""
    write_text(path, json.dumps(_no_nan(payload), indent=2, sort_keys=True) + "\n")


def variant_metrics(variants) -> dict[str, dict[str, float]]:
    """Each variant's `metrics/<variant>.json`, as its evaluate stage wrote it."""
    metrics = {}
    for variant in variants:
        path = variant_metrics_file(variant)
        if not path.exists():
            raise LetheError(f"{path}: no metrics for variant '{variant}'; run `dvc repro evaluate@{variant}` first")
        metrics[variant] = json.loads(path.read_text())
    return metrics


def baseline_costs() -> dict[str, float]:
    """The baseline's training costs: what a variant built from its weights cost to train."""
    path = train_metrics_file("baseline")
    costs = json.loads(path.read_text()) if path.exists() else {}
    return {k: v for k, v in costs.items() if k.startswith("cost/")}


def _no_nan(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def content_hash(path: str | Path) -> str:
    """md5 over a file, or over a directory's relative paths and file contents in sorted order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.md5()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(paths: list[Path]) -> str:
    """md5 over each file's path, size and modification time: a cheap key that changes when any file is
    replaced, for inputs too large to hash on every run (a Stable Diffusion pipeline)."""
    digest = hashlib.md5()
    for root in paths:
        root = Path(root).resolve()
        for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
            stat = file.stat()
            digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def save_outcomes(path: str | Path, outcomes: dict[str, dict]) -> None:
    """A variant's per-generation outcomes, by group (evaluation.figures), as one .npz, written atomically."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **{f"{group}/{name}": v for group, o in outcomes.items() for name, v in o.items()})
    os.replace(tmp, path)


def load_outcomes(path: str | Path) -> dict[str, dict]:
    import numpy as np

    out: dict[str, dict] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            group, name = key.split("/", 1)
            out.setdefault(group, {})[name] = archive[key]
    return out
