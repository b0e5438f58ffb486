"""`lethe repro`: DVC's stages side by side, recorded by DVC, on a real DVC repository of tiny stages."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# a reads seed.txt and writes a.txt; b and c each read it and take a second; d reads both
DVC_YAML = textwrap.dedent("""\
    stages:
      a:
        cmd: python step.py a seed.txt
        deps: [seed.txt]
        outs: [a.txt]
      b:
        cmd: python step.py b a.txt
        deps: [a.txt]
        outs: [b.txt]
      c:
        cmd: python step.py c a.txt
        deps: [a.txt]
        outs: [c.txt]
      d:
        cmd: python step.py d b.txt c.txt
        deps: [b.txt, c.txt]
        outs: [d.txt]
    """)
STEP = textwrap.dedent("""\
    import os, sys, time
    name, inputs = sys.argv[1], sys.argv[2:]
    if os.environ.get("FAIL") == name:
        sys.exit(3)
    share = open(os.environ["LETHE_CORES_FILE"]).read()
    with open("times.log", "a") as log:
        log.write(f"{name} start {time.time()} threads {os.environ.get('OMP_NUM_THREADS')} share {share}\\n")
    print(f"working on {name}", flush=True)
    time.sleep(1.0 if name in "bc" else 0.1)
    text = "".join(open(i).read() for i in inputs) + name
    open(f"{name}.txt", "w").write(text)
    with open("times.log", "a") as log:
        log.write(f"{name} end {time.time()}\\n")
    """)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "seed.txt").write_text("s")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_ROOT", None)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, env=env, check=True)
    return tmp_path, env


def lethe_repro(repo, env, *args, **extra):
    return subprocess.run([sys.executable, "-m", "lethe.cli", "repro", *args], cwd=repo, env={**env, **extra},
                          capture_output=True, text=True, check=False)


def times(repo) -> dict[str, float]:
    out = {}
    for line in (repo / "times.log").read_text().splitlines():
        name, event, when, *rest = line.split()
        out[f"{name} {event}"] = float(when)
        if rest:
            out[f"{name} threads"], out[f"{name} share"] = rest[1], rest[3]
    return out


def test_independent_stages_run_side_by_side_and_dvc_records_them(repo):
    repo, env = repo
    cores = os.cpu_count() or 1
    # every core to share out, also under a test worker (whose OMP_NUM_THREADS=1 caps them: the next test)
    result = lethe_repro(repo, env, "--jobs", "2", OMP_NUM_THREADS=str(cores))
    assert result.returncode == 0, result.stderr
    t = times(repo)
    assert t["b start"] < t["c end"] and t["c start"] < t["b end"]  # b and c overlapped
    assert t["a end"] <= min(t["b start"], t["c start"]) and t["d start"] >= max(t["b end"], t["c end"])
    assert t["b threads"] == t["b share"] == str(max(1, cores // 2))  # beside c: half the cores
    assert t["d threads"] == t["d share"] == str(cores)  # alone: all of them
    assert "b: working on b" in result.stdout and "4 stages ran" in result.stdout
    assert (repo / "d.txt").read_text() == "sabsacd"
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True, check=False).stdout
    assert "up to date" in status
    again = lethe_repro(repo, env)
    assert again.returncode == 0 and "0 stages ran, 4 up to date" in again.stdout

    # a changed input re-runs what depends on it, as dvc repro would; a target brings its upstream stages
    (repo / "seed.txt").write_text("t")
    rerun = lethe_repro(repo, env, "d")
    assert "4 stages ran" in rerun.stdout and (repo / "d.txt").read_text() == "tabtacd"


def test_a_failed_stage_stops_the_rest_and_keeps_what_finished(repo):
    repo, env = repo
    result = lethe_repro(repo, env, "--jobs", "2", FAIL="c")
    assert result.returncode == 3
    assert "stage 'c' failed with exit code 3" in result.stdout and "not started: d" in result.stdout
    assert not (repo / "d.txt").exists()
    status = subprocess.run(["dvc", "status", "b"], cwd=repo, env=env, capture_output=True, text=True, check=False).stdout
    assert "up to date" in status  # b finished beside c and is recorded


def test_an_unknown_stage_is_one_line_and_exit_2(repo):
    repo, env = repo
    result = lethe_repro(repo, env, "nosuch")
    assert result.returncode == 2 and "nosuch" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_interrupted_repro_stops_its_stages(repo):
    import signal
    import time

    repo, env = repo
    (repo / "dvc.yaml").write_text(DVC_YAML.replace("python step.py b a.txt", "python -c 'import time; time.sleep(60)'"))
    process = subprocess.Popen([sys.executable, "-m", "lethe.cli", "repro", "b"], cwd=repo, env=env,
                               stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "Running stage 'b'" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=90)  # 30 s was once too short beside a busy xdist worker (the exit, not the kill)
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True, check=False).stdout.split()
    assert not left  # the stage's sleep was stopped with lethe repro


def test_the_cores_shared_out_are_capped_by_omp_num_threads(monkeypatch):
    """Under a test worker (OMP_NUM_THREADS=1) a stage left running alone keeps one thread instead of
    taking both cores beside the other worker (two-thread pools spinning beside a busy core are slow)."""
    import os

    from lethe.repro import available_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    assert available_cores() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert available_cores() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    assert available_cores() == 8
