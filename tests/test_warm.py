"""The warm start (lethe.warm): a server that has imported what the stages import forks each `lethe <stage>`.

One server for the file, in one temporary project (its imports cost about 15 s). The stages run as the
`lethe` command a user types, in subprocesses; the last test makes the server refuse and exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lethe.warm import log_path, socket_path, start_server
from tests.conftest import ROOT, SMOKE

pytestmark = pytest.mark.slow


def lethe(*args, cwd: Path, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "lethe"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def log_lines(project: Path) -> list[str]:
    log = log_path(socket_path(project))
    return log.read_text().splitlines() if log.exists() else []


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    project = tmp_path_factory.mktemp("warm")
    params = yaml.safe_load(SMOKE.read_text())
    params["pretrain"]["steps"] = 100_000  # long enough to be interrupted
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "LETHE_WARM": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    server = start_server(600.0, socket_path(project))
    wait_for(lambda: any("ready" in line for line in log_lines(project)), 180, "the server's imports")
    yield project, env
    server.terminate()
    server.wait(30)


def test_a_stage_runs_in_a_child_of_the_server_with_the_callers_directory_streams_and_exit_code(warm):
    project, env = warm
    run = lethe("prepare", cwd=project, env=env)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert json.loads(out)["data/target_images"] == 40.0  # the stage's result, on the caller's stdout
    assert (project / "data" / "prepared").is_dir()  # written in the caller's directory
    assert any(line.startswith("lethe warm: prepare runs as") for line in log_lines(project))

    run = lethe("calibrate", cwd=project, env=env)  # no featurizer yet: a user's mistake, one line, exit 2
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("lethe: error: models/featurizer")
    assert sum("runs as" in line for line in log_lines(project)) == 2


def test_a_signal_to_the_caller_ends_the_stage_it_runs(warm):
    project, env = warm
    run = lethe("pretrain", cwd=project, env=env)
    line = wait_for(lambda: next((x for x in log_lines(project) if x.startswith("lethe warm: pretrain runs as")), None),
                    60, "the pretraining to start")
    child = int(line.split()[-1])
    time.sleep(3)  # into the training loop
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
             60, "the stage's process to end")


def test_a_child_takes_the_callers_directory_environment_command_line_main_script_and_threads(tmp_path):
    """What Lightning's DDP launcher reads to start the other ranks (`__main__.__spec__` None: it re-runs
    `python <argv0> args`; `python -m lethe.warm pretrain` would not run), and the caller's thread count."""
    request = {"cwd": str(tmp_path), "env": {"OMP_NUM_THREADS": "1", "MARK": "caller"},
               "argv0": "/venv/bin/lethe", "argv": ["train", "baseline"]}
    code = ("import json, os, sys, torch, threadpoolctl; from lethe.warm import become; "
            f"become(json.loads({json.dumps(json.dumps(request))}), 2); import __main__; "
            "print(json.dumps([os.getcwd(), os.environ.get('MARK'), sys.argv, __main__.__spec__, __main__.__file__, "
            "torch.get_num_threads(), max([p['num_threads'] for p in threadpoolctl.threadpool_info() "
            "if p['user_api'] == 'blas'] or [1])]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    assert json.loads(out) == [str(tmp_path), "caller", ["/venv/bin/lethe", "train", "baseline"], None,
                               "/venv/bin/lethe", 1, 1]


def test_changed_code_is_refused_and_the_stage_runs_in_its_own_process(warm, tmp_path):
    """Another copy of lethe on PYTHONPATH stands for code changed since the server started: the server
    refuses and exits, and the stage runs as it would without one, from the caller's code."""
    project, env = warm
    shutil.copytree(ROOT / "src" / "lethe", tmp_path / "lethe")
    run = lethe("prepare", cwd=project, env={**env, "PYTHONPATH": str(tmp_path)})
    out, err = run.communicate(timeout=180)
    assert run.returncode == 0, err
    assert json.loads(out)["data/target_images"] == 40.0
    assert any("refused" in line for line in log_lines(project))
    wait_for(lambda: not socket_path(project).exists(), 30, "the server to exit")
