import subprocess
import sys

import pytest
import yaml

from lethe.config import load_params
from lethe.errors import LetheError
from tests.conftest import SMOKE


def write_params(tmp_path, **changes):
    raw = yaml.safe_load(SMOKE.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_presets_validate():
    from tests.conftest import ROOT

    load_params(ROOT / "params.yaml")
    load_params(SMOKE)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(LetheError, match=r"unknown key 'pretrain.lr_max'"):
        load_params(write_params(tmp_path, **{"pretrain.lr_max": 1.0}))


def test_out_of_range_value_is_named(tmp_path):
    with pytest.raises(LetheError, match=r"'finetune.lr': Input should be greater than 0 \(got -0.1\)"):
        load_params(write_params(tmp_path, **{"finetune.lr": -0.1}))


def test_cross_key_rule_is_named(tmp_path):
    with pytest.raises(LetheError, match=r"data.folder is not set"):
        load_params(write_params(tmp_path, **{"data.source": "folder"}))


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "lethe.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "change, needle",
    [({"data.unknown": 1}, "unknown key 'data.unknown'"), ({"data.dup_share": 2.0}, "'data.dup_share'")],
)
def test_cli_bad_params_exit_2_with_one_line(tmp_path, change, needle):
    write_params(tmp_path, **change)
    result = run_cli(tmp_path, "prepare")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert not (tmp_path / "data").exists()  # nothing written


def test_missing_params_file(tmp_path):
    result = run_cli(tmp_path, "prepare")
    assert result.returncode == 2 and "params.yaml: not found" in result.stderr


def test_preset_is_written_with_every_section_for_dvc(tmp_path):
    """A preset without a method's section (it predates the method) becomes a params.yaml DVC can run."""
    from lethe.cli import main
    from lethe.config import Params

    preset, target = tmp_path / "preset.yaml", tmp_path / "params.yaml"
    preset.write_text("finetune: {steps: 7}\n")
    assert main(["--params", str(target), "preset", str(preset)]) == 0
    written = yaml.safe_load(target.read_text())
    assert set(written) == set(Params.model_fields)
    assert written["finetune"]["steps"] == 7 and written["random_skip"] == {"follows": "wen_filter", "share": 0.2, "seed": 0}
    assert load_params(target) == load_params(preset)


def test_bad_preset_writes_nothing(tmp_path, capsys):
    from lethe.cli import main

    preset, target = tmp_path / "preset.yaml", tmp_path / "params.yaml"
    preset.write_text("finetune: {stepz: 7}\n")
    assert main(["--params", str(target), "preset", str(preset)]) == 2
    assert "unknown key 'finetune.stepz'" in capsys.readouterr().err and not target.exists()
