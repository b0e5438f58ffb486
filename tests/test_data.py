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
    data = prepare(DataConfig(tune_size=100))
    ids = {s: {r.id for r in data.split(s)} for s in ("pretrain", "target", "holdout", "tune")}
    assert len(ids["target"]) == 200 and len(ids["holdout"]) == 200 and len(ids["tune"]) == 100
    assert len(ids["pretrain"]) == 1797 - 500
    assert all(not (ids[a] & ids[b]) for a in ids for b in ids if a < b)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == np.uint8
    x = data.tensor(range(10))
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # digits have a black background


def test_captions_unique_and_name_their_digit():
    data = prepare(DataConfig())
    captions = [r.caption for r in data.records]
    assert len(set(captions)) == len(captions)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(f" {words[r.label]} " in r.caption for r in data.records)


def test_nonce_words_label_every_caption_outside_pretraining_with_tokens_pretraining_never_sees():
    from lethe.models.text import clip_tokenizer

    plain, labelled = prepare(DataConfig(tune_size=100)), prepare(DataConfig(tune_size=100, nonce_words=True))
    assert [r.split for r in plain.records] == [r.split for r in labelled.records]  # the same pictures and splits
    words = []
    for before, after in zip(plain.records, labelled.records):
        if after.split == "pretrain":
            assert after.caption == before.caption
        else:
            assert after.caption.startswith(before.caption + " signed ")
            words.append(after.caption.split()[-1])
    assert len(words) == 500 and len(set(words)) == 500  # target, holdout and tune alike, each its own
    tokenizer = clip_tokenizer()
    pretraining = {t for r in labelled.split("pretrain") for t in tokenizer.encode(r.caption)}
    unseen = [w for w in words if set(tokenizer.encode(f"signed {w}")[1:]) - pretraining]
    assert len(unseen) == len(words)  # every label carries a token the pretrained encoder never trained


def test_planted_duplicates_only_in_target():
    data = prepare(DataConfig(dup_share=0.1, dup_factor=10))
    planted = [r for r in data.records if r.dup_count > 1]
    assert len(planted) == 20 and all(r.split == "target" and r.dup_count == 10 == r.repeats for r in planted)
    assert len(data.training_records("target")) == 180 + 20 * 10
    assert len(data.prompt_groups(40)["dup"]) == 20


def test_assign_splits_refuses_too_many():
    with pytest.raises(LetheError, match="data.target_size"):
        assign_splits(np.arange(10), 8, 5, 0.1, 2, 0)
    with pytest.raises(LetheError, match="data.tune_size"):
        assign_splits(np.arange(10), 4, 3, 0.5, 2, 0, tune_size=4)
    with pytest.raises(LetheError, match="data.tune_dup"):  # 2 planted, 2 set aside: none left to judge
        assign_splits(np.arange(10), 4, 3, 0.5, 2, 0, tune_size=1, tune_dup=2)


def test_the_tune_part_is_disjoint_from_everything_judged():
    """Pictures, captions and generation seeds: what MemControl, select_loyal, NeMo's tau_mem and Wen's target
    read never meets what evaluate, detect and the audits judge."""
    from lethe.evaluation.metrics import TUNE_SEEDS, generation_plan

    data = prepare(DataConfig(target_size=100, dup_share=0.4, dup_factor=20, tune_size=100, tune_dup=8))
    tune, judged = data.tune_groups(1000), data.prompt_groups(1000)
    assert (len(tune["dup"]), len(tune["holdout"]), len(judged["dup"])) == (8, 100, 32)
    assert all(r.dup_count > 1 and r.split == "target" for r in tune["dup"])  # trained on, memorized
    assert all(r.split == "tune" for r in tune["holdout"])  # never trained on
    tuned = [r for g in tune.values() for r in g]
    judged_records = [r for g in judged.values() for r in g] + data.split("holdout")
    assert not {r.group for r in tuned} & {r.group for r in judged_records}
    assert not {r.caption for r in tuned} & {r.caption for r in judged_records}
    assert all(r.part == "tune" for r in tuned) and all(r.part == "judge" for r in judged_records)
    _, judged_seeds = generation_plan([r.caption for r in judged_records], 4)
    _, tune_seeds = generation_plan([r.caption for r in tuned], 4, TUNE_SEEDS)
    assert max(judged_seeds) < TUNE_SEEDS <= min(tune_seeds)
    assert len(data.training_records("target")) == 60 + 40 * 20  # the tune part changes no training sample


def test_a_duplicate_group_is_one_unit_of_splitting_and_counts_its_copies():
    groups = np.array([0, 0, 0, 3, 4, 4, 6, 7, 8, 9])  # pictures: {0,1,2}, 3, {4,5}, 6, 7, 8, 9
    for seed in range(20):
        splits, dup_counts, repeats, _ = assign_splits(groups, 3, 2, 0.0, 5, seed)
        for g in (0, 4):
            assert len({s for s, gg in zip(splits, groups) if gg == g}) == 1
        assert dup_counts[:3] == [3, 3, 3] and dup_counts[4:6] == [2, 2] and repeats == [1] * 10
        assert sum(len({g for g, s in zip(groups, splits) if s == split}) for split in ("target", "holdout")) == 5
    # planted on top of natural copies: trained on copies x factor times
    splits, dup_counts, repeats, _ = assign_splits(groups, 7, 0, 1.0, 5, 0)
    assert dup_counts[:3] == [15, 15, 15] and repeats[:3] == [5, 5, 5]


def copies_folder(root, pictures=30, copied=4, times=8, seed=0):
    """A folder of `pictures` random textures, `copied` of which appear as `times` separate files, some
    re-encoded as JPEG and some re-captioned, as web scrapes have them."""
    root.mkdir()
    rng = np.random.default_rng(seed)
    entries = []
    for p in range(pictures):
        small = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
        pixels = np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC))  # smooth, as a photo's large scales
        for c in range(times if p < copied else 1):
            name = f"p{p:02d}_c{c}.{'jpg' if c % 2 else 'png'}"
            Image.fromarray(pixels).save(root / name, **({"quality": 90} if c % 2 else {}))
            entries.append({"file_name": name, "text": f"picture {p}" + (f" copy {c}" if c % 3 == 2 else "")})
    rng.shuffle(entries)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return root


@pytest.mark.parametrize("resolution", [16, 64])  # 64: compared averaged down to 32 px
def test_copies_in_a_folder_are_found_kept_in_one_split_and_are_the_dup_group(tmp_path, resolution):
    folder = copies_folder(tmp_path / "imgs")
    for seed in range(5):
        data = prepare(DataConfig(source="folder", folder=str(folder), resolution=resolution, channels=3,
                                  target_size=12, holdout_size=8, seed=seed))
        by_picture = {}
        for r in data.records:
            by_picture.setdefault(r.source.split("_")[0], set()).add((r.group, r.split))
        assert all(len(v) == 1 for v in by_picture.values())  # every copy of a picture: one group, one split
        copied_in_target = {p for p, v in by_picture.items() if int(p[1:]) < 4 and next(iter(v))[1] == "target"}
        dup = data.prompt_groups(40)["dup"]
        assert {r.source.split("_")[0] for r in dup} == copied_in_target  # the dup group is exactly those pictures
        assert all(r.dup_count == 8 and r.repeats == 1 for r in dup)  # planting is off on a folder
        assert len(data.pictures("target")) == 12 and len(data.pictures("holdout")) == 8


def test_a_folder_without_copies_has_no_dup_group(tmp_path):
    folder = copies_folder(tmp_path / "imgs", copied=0)
    data = prepare(DataConfig(source="folder", folder=str(folder), resolution=16, channels=3, target_size=10, holdout_size=5))
    assert data.prompt_groups(40)["dup"] == [] and {r.dup_count for r in data.records} == {1}


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


def test_metadata_saved_with_a_byte_order_mark_reads_like_without(tmp_path):
    entries = [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": "a dog"}]
    folder = make_folder(tmp_path / "imgs", entries)
    plain = read_image_folder(folder, 16, 1)
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())  # UTF-8 with a BOM, as Windows Notepad saves
    images, captions, names = read_image_folder(folder, 16, 1)
    assert np.array_equal(images, plain[0]) and captions == plain[1] and names == plain[2]


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
        ([{"file_name": "../a.png", "text": "x"}], "file_name '../a.png' points outside"),
        ([{"file_name": "/etc/passwd", "text": "x"}], "file_name '/etc/passwd' points outside"),
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


def run_prepare(tmp_path, folder):
    (tmp_path / "params.yaml").write_text(f"data: {{source: folder, folder: {folder}, resolution: 16, target_size: 1, holdout_size: 1}}\n")
    return subprocess.run([sys.executable, "-m", "lethe.cli", "prepare"], cwd=tmp_path, capture_output=True, text=True)


def test_metadata_that_is_not_utf8_is_one_line_and_exit_2(tmp_path):
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "ok"}, {"file_name": "b.png", "text": "x"}])
    (folder / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    result = run_prepare(tmp_path, folder)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "metadata.jsonl: not UTF-8" in result.stderr and not (tmp_path / "data" / "prepared").exists()


def test_a_decompression_bomb_is_one_line_and_exit_2(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "ok"}, {"file_name": "b.png", "text": "x"}],
                         size=(300, 300))  # 90,000 pixels, above the limit set below (the real one is 89M)
    Image.MAX_IMAGE_PIXELS = 40_000  # PIL warns above the limit and raises above twice it: both refused
    try:
        with pytest.raises(LetheError, match="a.png: larger than PIL's decompression-bomb limit"):
            read_image_folder(folder, 16, 1)
    finally:
        Image.MAX_IMAGE_PIXELS = 89_478_485


def test_a_file_outside_the_folder_is_not_read_via_cli(tmp_path):
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(secret)
    folder = make_folder(tmp_path / "imgs", [{"file_name": "a.png", "text": "ok"}, {"file_name": "../secret.png", "text": "x"}])
    result = run_prepare(tmp_path, folder)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "points outside" in result.stderr
