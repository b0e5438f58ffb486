import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lethe.config import DataConfig
from lethe.data.prepared import PreparedData, assign_splits
from lethe.data.sources import prepare, read_image_folder
from lethe.errors import LetheError


def test_digits_splits_are_disjoint_and_sized():
    data = prepare(DataConfig())
    ids = {s: {r.id for r in data.split(s)} for s in ("pretrain", "target", "holdout")}
    assert len(ids["target"]) == 200 and len(ids["holdout"]) == 200 and len(ids["pretrain"]) == 1797 - 400
    assert not (ids["target"] & ids["holdout"]) and not (ids["pretrain"] & (ids["target"] | ids["holdout"]))
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == np.uint8
    x = data.tensor(range(10))
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # digits have a black background


def test_captions_unique_and_name_their_digit():
    data = prepare(DataConfig())
    captions = [r.caption for r in data.records]
    assert len(set(captions)) == len(captions)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(f" {words[r.label]} " in r.caption for r in data.records)


def test_planted_duplicates_only_in_target():
    data = prepare(DataConfig(dup_share=0.1, dup_factor=10))
    planted = [r for r in data.records if r.dup_count > 1]
    assert len(planted) == 20 and all(r.split == "target" and r.dup_count == 10 for r in planted)
    assert len(data.training_records("target")) == 180 + 20 * 10


def test_assign_splits_refuses_too_many():
    with pytest.raises(LetheError, match="data.target_size"):
        assign_splits(10, 8, 5, 0.1, 2, 0)


def test_save_load_round_trip(tmp_path):
    data = prepare(DataConfig(target_size=40, holdout_size=40))
    data.save(tmp_path / "prepared")
    again = PreparedData.load(tmp_path / "prepared")
    assert again.records == data.records and np.array_equal(again.images, data.images)
    assert not list(tmp_path.glob(".prepared*"))  # no temporary leftovers


def make_folder(root, entries, size=(40, 30)):
    root.mkdir()
    for i, entry in enumerate(entries):
        if entry.get("file_name", "").endswith(".png") and not entry["file_name"].startswith("gone"):
            Image.fromarray((np.random.default_rng(i).random(size) * 255).astype(np.uint8)).save(root / entry["file_name"])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return root


def test_image_folder_resizes(tmp_path):
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": "a dog"}])
    images, captions, names = read_image_folder(folder, 16, 3)
    assert images.shape == (2, 3, 16, 16) and captions == ["a cat", "a dog"] and names == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"file_name": "a.png"}], "metadata.jsonl:1: missing caption ('text') for a.png"),
        ([{"file_name": "a.png", "text": "  "}], "missing caption"),
        ([{"file_name": "gone.png", "text": "x"}], "gone.png: listed in"),
        ([{"text": "x"}], "missing 'file_name'"),
    ],
)
def test_image_folder_errors(tmp_path, entries, message):
    folder = make_folder(tmp_path / "imgs", entries)
    with pytest.raises(LetheError) as info:
        read_image_folder(folder, 16, 1)
    assert message in str(info.value)


def test_unreadable_image_via_cli_exits_2(tmp_path):
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "ok"}, {"file_name": "bad.png", "text": "x"}])
    (folder / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "params.yaml").write_text(
        f"data: {{source: folder, folder: {folder}, resolution: 16, target_size: 1, holdout_size: 1}}\n"
    )
    result = subprocess.run([sys.executable, "-m", "lethe.cli", "prepare"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "bad.png: unreadable image" in result.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_missing_caption_via_cli_exits_2(tmp_path):
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "ok"}, {"file_name": "b.png"}])
    (tmp_path / "params.yaml").write_text(f"data: {{source: folder, folder: {folder}, target_size: 1, holdout_size: 1}}\n")
    result = subprocess.run([sys.executable, "-m", "lethe.cli", "prepare"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "metadata.jsonl:2: missing caption" in result.stderr
