"""Where images come from: the embedded digits, or a user's image folder with `metadata.jsonl`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from lethe.config import DataConfig
from lethe.data.captions import unique_captions, with_nonce_words
from lethe.data.duplicates import duplicate_groups
from lethe.data.prepared import PreparedData, Record, assign_splits
from lethe.errors import LetheError


def load_digits_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (shipped in its wheel), upsampled to `resolution`, as uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    big = F.interpolate(small, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return big.clamp(0, 1).mul(255).round().to(torch.uint8).numpy(), digits.target


def read_image_folder(folder: str | Path, resolution: int, channels: int):
    """Images and captions listed in `metadata.jsonl` (Hugging Face image-folder convention)."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.exists():
        raise LetheError(f"{metadata}: not found; an image folder needs metadata.jsonl with file_name and text")
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark (Notepad's) is skipped
    except UnicodeDecodeError as exc:
        raise LetheError(f"{metadata}: not UTF-8 text (byte {exc.start}); save it as UTF-8")
    images, captions, names = [], [], []
    root = folder.resolve()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise LetheError(f"{where}: not a JSON object")
        if not isinstance(entry, dict) or not entry.get("file_name"):
            raise LetheError(f"{where}: missing 'file_name'")
        caption = entry.get("text")
        if not isinstance(caption, str) or not caption.strip():
            raise LetheError(f"{where}: missing caption ('text') for {entry['file_name']}")
        file = folder / entry["file_name"]
        if Path(entry["file_name"]).is_absolute() or not file.resolve().is_relative_to(root):
            raise LetheError(f"{where}: file_name '{entry['file_name']}' points outside {folder}")
        if not file.is_file():
            raise LetheError(f"{file}: listed in {where} but missing")
        images.append(_load_resized(file, resolution, channels))
        captions.append(caption.strip())
        names.append(entry["file_name"])
    if not images:
        raise LetheError(f"{metadata}: lists no images")
    return np.stack(images), captions, names


def _load_resized(file: Path, resolution: int, channels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns below twice its limit
            image = Image.open(file)
        with image:
            image = image.convert("L" if channels == 1 else "RGB")
            # centre-crop to a square, then resize: the usual text-to-image preprocessing
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LetheError(f"{file}: larger than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels; "
                         "shrink it or remove it from metadata.jsonl")
    except (UnidentifiedImageError, OSError) as exc:
        raise LetheError(f"{file}: unreadable image ({type(exc).__name__}); fix or remove it from metadata.jsonl")
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def prepare(cfg: DataConfig) -> PreparedData:
    """Build the dataset the config asks for: duplicate groups found, split by group, duplicates planted."""
    if cfg.source == "digits":
        if cfg.channels != 1:
            raise LetheError("params.yaml: 'data.channels' must be 1 for the grayscale digits")
        images, labels = load_digits_images(cfg.resolution)
        captions = unique_captions(labels, seed=cfg.seed)
        labels, sources = [int(x) for x in labels], [f"sklearn-digits:{i}" for i in range(len(images))]
    else:
        images, captions, sources = read_image_folder(cfg.folder, cfg.resolution, cfg.channels)
        labels = [None] * len(images)
    groups = duplicate_groups(images, dedup_features(cfg, images), cfg.dedup_distance)
    splits, dup_counts, repeats, parts = assign_splits(
        groups, cfg.target_size, cfg.holdout_size, cfg.planted_share, cfg.dup_factor, cfg.seed, cfg.tune_size,
        cfg.tune_dup if cfg.planted_share else 0,
    )
    if cfg.nonce_words:
        captions = with_nonce_words(captions, splits, cfg.seed)
    records = [
        Record(id=i, split=splits[i], caption=captions[i], dup_count=dup_counts[i], label=labels[i], source=sources[i],
               group=int(groups[i]), repeats=repeats[i], part=parts[i])
        for i in range(len(images))
    ]
    return PreparedData(images=images, records=records)


def dedup_features(cfg: DataConfig, images: np.ndarray) -> torch.Tensor | None:
    """Features for near-copy search (None: pixels, compared directly)."""
    if cfg.dedup_features == "pixels":
        return None
    from lethe.data.prepared import to_float
    from lethe.memorization.features import load_features

    return load_features(cfg.dedup_features, cfg.dedup_features_path)(to_float(images))
