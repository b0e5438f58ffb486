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


def caller_environment() -> dict[str, str]:
    """A user's environment for the stages: every variable a caller and the server must agree on is fixed
    (not pytest's PYTEST_CURRENT_TEST, which changes from test to test), with the warm start on."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT") and not k.startswith("PYTEST_CURRENT")}
    return {**env, "LETHE_WARM": "1"}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    project = tmp_path_factory.mktemp("warm")
    params = yaml.safe_load(SMOKE.read_text())
    params["pretrain"]["steps"] = 100_000  # long enough to be interrupted
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = caller_environment()
    server = start_server(600.0, socket_path(project), env)
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
    code = ("import json, os, sys, torch, threadpoolctl; from lethe.warm_child import become; "
            f"become(json.loads({json.dumps(json.dumps(request))}), 2); import __main__; "
            "print(json.dumps([os.getcwd(), os.environ.get('MARK'), sys.argv, __main__.__spec__, __main__.__file__, "
            "torch.get_num_threads(), max([p['num_threads'] for p in threadpoolctl.threadpool_info() "
            "if p['user_api'] == 'blas'] or [1])]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    assert json.loads(out) == [str(tmp_path), "caller", ["/venv/bin/lethe", "train", "baseline"], None,
                               "/venv/bin/lethe", 1, 1]


def test_another_environment_is_refused_alone_and_the_stage_runs_in_its_own_process(warm, tmp_path):
    """Another copy of lethe on PYTHONPATH: a variable differs, so that request is refused (the stage runs
    cold, from the caller's code) and the server stays for the next."""
    project, env = warm
    shutil.copytree(ROOT / "src" / "lethe", tmp_path / "lethe")
    run = lethe("prepare", cwd=project, env={**env, "PYTHONPATH": str(tmp_path)})
    out, err = run.communicate(timeout=180)
    assert run.returncode == 0, err
    assert json.loads(out)["data/target_images"] == 40.0
    assert any("refused ['prepare'] (another copy of lethe)" in line for line in log_lines(project))
    assert socket_path(project).exists() and not any("exiting" in line for line in log_lines(project))


def test_a_stage_keeps_a_signal_its_caller_ignores(warm):
    """`nohup lethe pretrain`: SIGHUP is ignored by the caller, so the stage it runs ignores it too."""
    project, env = warm
    before = len(log_lines(project))
    run = lethe("pretrain", cwd=project, env=env, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    line = wait_for(lambda: next((x for x in log_lines(project)[before:] if x.startswith("lethe warm: pretrain runs as")),
                                 None), 60, "the pretraining to start")
    child = int(line.split()[-1])
    time.sleep(2)
    run.send_signal(signal.SIGHUP)
    os.kill(child, signal.SIGHUP)  # as a closing terminal sends it to the whole session
    time.sleep(3)
    assert run.poll() is None and Path(f"/proc/{child}").exists()
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another user")
def test_another_user_is_refused_by_the_server_itself(warm):
    """Even with the folders and the socket opened to everyone, a connection from another uid is refused alone."""
    project, env = warm
    sock = socket_path(project)
    opened = [(d, d.stat().st_mode & 0o7777) for d in [sock.parent, *sock.parent.parents]]
    for folder, mode in opened:
        os.chmod(folder, mode | 0o011)  # others may pass through, not list or write
    os.chmod(sock, 0o666)
    try:
        code = ("import json, socket, sys; c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); "
                "socket.send_fds(c, [b'L'], [0, 1, 2]); c.sendall(json.dumps({'argv': ['prepare']}).encode() + b'\\n'); "
                "print(c.makefile().readline() or 'closed')")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-S", "-c",
                              code, str(sock)], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "closed", out.stderr
        assert any("refused ['prepare'] (another user)" in line for line in log_lines(project))
        assert sock.exists()  # refused alone: the server stays
    finally:
        for folder, mode in opened:
            os.chmod(folder, mode)
        os.chmod(sock, 0o600)


def test_an_unusable_lethe_folder_runs_the_stage_cold(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(SMOKE.read_text())
    (project / ".lethe").write_text("not a folder")  # a file where the folder would be
    run = lethe("prepare", cwd=project, env=caller_environment())
    out, err = run.communicate(timeout=180)
    assert run.returncode == 0, err
    assert json.loads(out)["data/target_images"] == 40.0 and (project / ".lethe").is_file()


def test_stages_run_warm_write_what_they_write_cold_bit_for_bit(warm, tmp_path):
    """prepare and a short pretraining of the smoke preset, through the server and in their own processes
    (one thread each, as float sums depend on it): the same bytes."""
    project, env = warm
    params = yaml.safe_load(SMOKE.read_text())
    params["pretrain"]["steps"] = 20
    outputs, before = {}, len(log_lines(project))
    for mode in ("warm", "cold"):
        folder = project / mode  # under the server's project: DVC_ROOT points the stage at its socket
        folder.mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        mode_env = {**env, "DVC_ROOT": str(project), "OMP_NUM_THREADS": "1", "LETHE_WARM": "1" if mode == "warm" else "0"}
        for stage in ("prepare", "pretrain"):
            run = lethe(stage, cwd=folder, env=mode_env)
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
        outputs[mode] = {str(f.relative_to(folder)): f.read_bytes()
                         for f in sorted([*(folder / "data/prepared").rglob("*"), *(folder / "models/pretrained").rglob("*")])
                         if f.is_file()}
    forked = [line.split()[2] for line in log_lines(project)[before:] if "runs as" in line]
    assert forked == ["prepare", "pretrain"]  # the warm ones, through the server; the cold ones not
    assert outputs["warm"].keys() == outputs["cold"].keys() and "models/pretrained/weights.safetensors" in outputs["warm"]
    assert [k for k in outputs["warm"] if outputs["warm"][k] != outputs["cold"][k]] == []


def test_code_changed_since_the_server_started_makes_it_exit(warm):
    """Last: an imported file's change (its mtime) is stale code; the request is refused and the server exits."""
    project, env = warm
    module = ROOT / "src" / "lethe" / "stages" / "prepare.py"
    info = module.stat()
    os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    try:
        run = lethe("prepare", cwd=project, env=env)
        _, err = run.communicate(timeout=180)
        assert run.returncode == 0, err
    finally:
        os.utime(module, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert any("refused" in line and "changed" in line and "exiting" in line for line in log_lines(project))
    wait_for(lambda: not socket_path(project).exists(), 30, "the server to exit")
