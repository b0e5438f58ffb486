"""Progress a person can see, in a log too: a stage run with its output in a file (as under
`dvc repro > log`) writes a line per update of its progress, never a carriage return, and none of the
libraries' banners."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from lethe import progress as progress_module


def test_progress_in_a_log_is_one_line_per_update(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    for _ in progress_module.progress(range(3), desc="work", unit="item"):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("work:") and "0/3" in lines[0] and "3/3" in lines[-1]


@pytest.mark.slow
def test_a_training_stage_log_shows_its_steps_and_loss_and_no_library_banners(project):
    with open(project / "stage.log", "w") as log:
        for stage in ("prepare", "pretrain"):
            subprocess.run([sys.executable, "-m", "lethe.cli", stage], cwd=project, stdout=log, stderr=subprocess.STDOUT,
                           check=True, timeout=600)
    text = (project / "stage.log").read_text()
    assert re.search(r"^train: 100%.* (\d+)/\1 .*loss=\d", text, re.M), text[-2000:]
    assert "\r" not in text
    for banner in ("Tip:", "GPU available", "deprecated", "flops_per_batch"):
        assert banner not in text, banner


def test_a_bar_follows_the_share_of_cores_lethe_repro_gives(monkeypatch, tmp_path):
    import torch

    from lethe import progress as module

    before = torch.get_num_threads()
    share = tmp_path / "cores"
    share.write_text("1")
    monkeypatch.setenv(module.CORES_FILE, str(share))
    monkeypatch.setattr(module, "_last_follow", [float("-inf")])
    try:
        torch.set_num_threads(2)
        list(module.progress(range(3), desc="x"))  # iterating is a heartbeat too
        assert torch.get_num_threads() == 1
        share.write_text("2")
        bar = module.progress(total=3, desc="y")
        bar.update()  # within FOLLOW_INTERVAL of the last read: nothing changes yet
        assert torch.get_num_threads() == 1
        module._last_follow[0] = float("-inf")
        bar.update()
        bar.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
