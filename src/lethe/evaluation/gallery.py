"""A gallery PNG: each generation beside its nearest training images, with the replication scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the machines that run the pipeline
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lethe.memorization.neighbors import nearest_neighbors  # noqa: E402

NEIGHBOURS = 3


def _show(ax, image: torch.Tensor, title: str) -> None:
    pixels = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def save_gallery(groups: list[tuple], train_pixels: torch.Tensor, path: str | Path) -> None:
    """groups: (name, images, captions, scores) per prompt group; one row per generation."""
    rows = sum(len(images) for _, images, _, _ in groups)
    fig, axes = plt.subplots(rows, NEIGHBOURS + 1, figsize=(1.6 * (NEIGHBOURS + 1), 1.5 * rows), squeeze=False)
    row = 0
    for name, images, captions, scores in groups:
        distances, indices = nearest_neighbors(images, train_pixels, k=NEIGHBOURS)
        for i, image in enumerate(images):
            copied = "COPY " if bool(scores["copied"][i]) else ""
            _show(axes[row, 0], image, f"{copied}{name}: sim {scores['sim'][i]:.2f} relL2 {scores['rel_l2'][i]:.2f}\n"
                                       f"{captions[i][:34]}")
            for j in range(NEIGHBOURS):
                _show(axes[row, j + 1], train_pixels[indices[i, j]], f"train #{j + 1}  L2 {distances[i, j]:.2f}")
            row += 1
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
