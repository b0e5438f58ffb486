"""Every training stage gives the same bytes when it is run again: DVC's promise that a re-run reproduces
its outputs rests on it. torch seeds its generator from entropy in every new process; each run here
starts from a different generator state, as two processes would, so a weight drawn before the stage
seeds (RAU-Net's transfer blocks, LoRA's A matrices, before the fix) shows up as different bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from lethe.cli import main
from lethe.methods import METHODS
from tests.conftest import SMOKE


def weights_hash(project, method: str) -> str:
    return hashlib.sha256((project / f"models/{method}/weights.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_every_training_method_gives_identical_weights_twice(project):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["pretrain"]["steps"] = raw["finetune"]["steps"] = 4
    raw["probe"] = {"prompts_per_group": 1, "seeds_per_prompt": 1}
    raw["sample"]["grid_size"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in (["prepare"], ["shard"], ["pretrain"]):
        assert main(stage) == 0, stage
    from lethe.models.diffusion_model import load_model
    from lethe.training.peft_masks import transformer_blocks

    blocks = transformer_blocks(load_model(project / "models/pretrained").unet)
    (project / "search").mkdir()
    (project / "search/memcontrol.json").write_text(json.dumps(  # what the search writes, for one LoRA block
        {"family": "lora", "blocks": blocks[:1], "lr": 1e-3, "lora_rank": 2, "lora_alpha": 2.0}))
    (project / "search/loyal.json").write_text(json.dumps({"skips": [[0, 1], [1, 0]], "tau": 500}))  # select_loyal's
    for method in METHODS:
        hashes = []
        for run in range(2):
            torch.manual_seed(1000 + run)  # another process's state
            assert main(["train", method]) == 0, method
            hashes.append(weights_hash(project, method))
        assert hashes[0] == hashes[1], f"train@{method} gave different weights on a re-run"
    # each training run keeps its skipped share per step; the control drops, step by step, what wen_filter skipped
    wen = json.loads((project / "models/wen_filter/skipped_per_step.json").read_text())
    control = json.loads((project / "models/random_skip/skipped_per_step.json").read_text())
    assert len(wen) == 4 and control == pytest.approx(wen)  # shares of a batch of 8: k/8, copied exactly
    metrics = json.loads((project / "metrics/train/random_skip.json").read_text())
    assert metrics["train/skipped_share_mean"] == pytest.approx(sum(wen) / 4)
    for method in ("ietagc", "ietagc_plus", "memattn_filter"):  # each one's own control follows its curve
        followed = json.loads((project / f"models/{method}/skipped_per_step.json").read_text())
        blind = json.loads((project / f"models/random_skip_{method}/skipped_per_step.json").read_text())
        assert blind == pytest.approx(followed), method
    for plain in ("baseline", "iet"):  # iet: IET-AGC's ensemble with anti-gradient control off
        assert json.loads((project / f"models/{plain}/skipped_per_step.json").read_text()) == [0.0] * 4, plain
