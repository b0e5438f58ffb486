"""A small CNN trained on the pretraining split: features for a Fréchet distance, and a digit classifier.

Its features stand in for Inception's at 16x16 (so the distance is called FD, not FID); its classifier
tells whether a generated digit matches its caption's digit (prompt accuracy). Trained with a plain
loop: a few hundred steps of a classifier need none of the diffusion machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lethe.errors import LetheError


class Featurizer(nn.Module):
    def __init__(self, channels: int, num_classes: int, feature_dim: int):
        super().__init__()
        self.spec = {"channels": channels, "num_classes": num_classes, "feature_dim": feature_dim}
        self.num_features = feature_dim  # torchmetrics reads this instead of probing with a 299x299 image
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, feature_dim),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of images in [-1, 1] (what torchmetrics' FD calls)."""
        return self.body(images.float())

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.forward(images)))


@torch.no_grad()
def prompt_accuracy(featurizer, images: torch.Tensor, labels: list[int | None]) -> float | None:
    """The share of generations the featurizer classifies as their prompt's digit; None without labels
    (an image folder) or without a classifier (another feature space)."""
    correct = prompt_correct(featurizer, images, labels)
    return None if correct is None else correct.float().mean().item()


def prompt_correct(featurizer, images: torch.Tensor, labels: list[int | None]) -> torch.Tensor | None:
    """Per generation: does the featurizer classify it as its prompt's digit (None as prompt_accuracy)."""
    if not isinstance(featurizer, Featurizer) or any(label is None for label in labels):
        return None
    return featurizer.classify(images).argmax(1) == torch.tensor(labels)


def train_featurizer(images: torch.Tensor, labels: torch.Tensor, feature_dim: int, steps: int, batch_size: int,
                     lr: float, seed: int) -> Featurizer:
    torch.manual_seed(seed)
    net = Featurizer(images.shape[1], int(labels.max()) + 1, feature_dim)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()  # one-pixel jitter, as digits are not centred
        x = torch.roll(images[batch], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net.classify(x), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: Featurizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (net.classify(images).argmax(1) == labels).float().mean().item()


def save_featurizer(net: Featurizer, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path / "weights.safetensors")
    (path / "config.json").write_text(json.dumps(net.spec) + "\n")


NO_LABELS = {"featurizer": None, "reason": "the images have no labels (an image folder): FD and diversity use evaluate.features"}


def has_featurizer(path: str | Path) -> bool:
    """False where the featurizer stage ran on unlabelled images (an image folder) and trained nothing."""
    config = Path(path) / "config.json"
    return config.exists() and "featurizer" not in json.loads(config.read_text())


def load_featurizer(path: str | Path) -> Featurizer:
    path = Path(path)
    if not (path / "config.json").exists():
        raise LetheError(f"{path}: no featurizer here; run `dvc repro featurizer` first")
    if not has_featurizer(path):
        raise LetheError(f"{path}: no featurizer for unlabelled images; set evaluate.features to sscd, open_clip or pixels")
    net = Featurizer(**json.loads((path / "config.json").read_text()))
    net.load_state_dict(load_file(path / "weights.safetensors"))
    return net.eval()
