"""The tests' tiny random Stable-Diffusion-shaped checkpoint (lethe.models.random_sd, a few hundred kB)."""

from __future__ import annotations

from pathlib import Path

from lethe.models.random_sd import build_random_sd


def build_tiny_sd(path: Path, image_size: int = 16) -> Path:
    return build_random_sd(path, image_size, size="tiny")
