"""`lethe repro`: `dvc repro` with independent stages side by side.

DVC runs one stage at a time, each with every core. On a 2-core machine two stages side by side with one
thread each finish 1.6x sooner than one after another with two threads (`benchmarks/parallel.py`): a small
U-Net's operators are too short for two threads to share well. So this walks DVC's own stage graph and
starts a stage as soon as every stage it depends on is done, up to `jobs` at a time, each with
cores / jobs threads. DVC decides everything else as it would: a stage runs only if `stage.changed()`,
its outputs are removed first, and after it succeeds `dvc commit` records it in dvc.lock and the cache.
Afterwards `dvc status` is clean and `dvc repro` has nothing to do.

The cores (the CPU count, capped by OMP_NUM_THREADS when set) are shared out as the stages come and go: `.lethe/repro/cores` holds cores / running stages,
and each stage's long loops follow it (`lethe.progress`), so the pretraining that runs alone for most of
its time takes both cores instead of the one it started with beside the featurizer.

Under LETHE_WARM=1 the stages start warm: a server that has imported what they import forks each one
(`lethe.warm`), so a stage's fixed cost is a fork, not seconds of imports. Without it (the default) each
stage is an ordinary process.

Each line a stage prints comes out prefixed with the stage's name, so two stages' progress can be told
apart in one log. The first failure stops new stages from starting; the running ones finish and are
recorded, and the failing stage's exit code is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lethe.errors import LetheError
from lethe.files import write_text
from lethe.paths import REPRO_CORES
from lethe.progress import CORES_FILE
from lethe.warm import enabled, socket_path, start_server

RUN_IDLE_SECONDS = 3600.0  # the run's warm server is stopped when the run ends


def _plan(repo, targets: list[str]) -> tuple[list[str], dict[str, set[str]]]:
    """The stages to consider, in the order to start them, and each one's upstream stages (by address).
    A stage starts once its upstream stages are done; among those that may start, the one more stages wait
    for goes first: the baseline's fine-tune and evaluation before the other variants', which need them."""
    import networkx as nx

    graph = repo.index.graph  # edges point from a stage to the stages it depends on
    if targets:
        try:
            chosen = {stage for target in targets for stage in repo.stage.collect(target)}
        except Exception as exc:  # DVC's own "stage not found" and friends
            raise LetheError(str(exc)) from exc
        wanted = set(chosen)
        for stage in chosen:
            wanted |= nx.descendants(graph, stage)
    else:
        wanted = set(graph.nodes)
    sub = graph.subgraph(wanted)
    topological = list(reversed(list(nx.topological_sort(sub))))
    order = [stage.addressing for stage in sorted(topological, key=lambda stage: -len(nx.ancestors(sub, stage)))]
    upstream = {stage.addressing: {dep.addressing for dep in sub.successors(stage)} for stage in sub.nodes}
    return order, upstream


def _stage(repo, address: str):
    return repo.stage.collect(address)[0]


def _prepare(address: str):
    """Whether the stage must run; if so its outputs are removed, as `dvc repro` does, and its command is
    returned."""
    from dvc.repo import Repo

    with Repo() as repo, repo.lock:
        stage = _stage(repo, address)
        if stage.frozen or not stage.cmd or not stage.changed():
            return None
        stage.remove_outs(ignore_remove=False, force=False)
        return stage.cmd, stage.wdir


def _commit(address: str) -> None:
    from dvc.repo import Repo

    with Repo() as repo:
        repo.commit(address, force=True)


def _relay(address: str, process: subprocess.Popen, out) -> None:
    for line in process.stdout:
        out.write(f"{address}: {line}" if line.endswith("\n") else f"{address}: {line}\n")
        out.flush()


def available_cores() -> int:
    """The cores to share out: the CPU count, or fewer where OMP_NUM_THREADS caps the threads (a test
    worker beside another, a shared machine)."""
    cores = os.cpu_count() or 1
    try:
        return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS") or cores)))
    except ValueError:
        return cores


def repro(targets: list[str], jobs: int, out=sys.stdout) -> int:
    """Reproduce `targets` (every stage when empty) with up to `jobs` stages at a time; the exit code."""
    from dvc.repo import Repo

    started = time.perf_counter()
    with Repo() as repo:
        order, upstream = _plan(repo, targets)
        root = Path(repo.root_dir)
    cores_file = root / REPRO_CORES
    cores = available_cores()

    def share(stages: int) -> str:  # each running stage's threads, written where the stages read it
        threads = str(max(1, cores // max(1, stages)))
        write_text(cores_file, threads)
        return threads

    pending, running, done, ran, failed = list(order), {}, set(), [], None
    warm = None  # the run's warm server, started with the first stage that runs
    try:
        while pending or running:
            for address in list(pending):
                if failed is not None or len(running) >= jobs:
                    break
                if not upstream[address] <= done:
                    continue
                pending.remove(address)
                command = _prepare(address)
                if command is None:
                    out.write(f"Stage '{address}' didn't change, skipping\n")
                    done.add(address)
                    continue
                cmd, wdir = command
                if warm is None and enabled():
                    warm = start_server(RUN_IDLE_SECONDS, socket_path(root))
                out.write(f"Running stage '{address}':\n> {cmd}\n")
                out.flush()
                threads = share(len(running) + 1)
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       CORES_FILE: str(cores_file)}
                process = subprocess.Popen(cmd, shell=True, cwd=wdir, env=env, text=True, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, bufsize=1, start_new_session=True)
                relay = threading.Thread(target=_relay, args=(address, process, out), daemon=True)
                relay.start()
                running[address] = (process, relay, time.perf_counter())
            finished = [a for a, (p, _, _) in running.items() if p.poll() is not None]
            if not finished:
                if failed is not None and not running:
                    break
                time.sleep(0.2)
                continue
            for address in finished:
                process, relay, began = running.pop(address)
                share(len(running))
                relay.join()
                if process.returncode != 0:
                    out.write(f"lethe repro: stage '{address}' failed with exit code {process.returncode}\n")
                    failed = failed if failed is not None else process.returncode
                    continue
                _commit(address)
                done.add(address)
                ran.append(address)
                out.write(f"Stage '{address}' done in {time.perf_counter() - began:.0f} s, recorded in dvc.lock\n")
                out.flush()
            if failed is not None and not running:
                break
    finally:  # interrupted (Ctrl-C, an error here): no stage DVC has not recorded keeps running
        for process, _, _ in running.values():
            os.killpg(process.pid, signal.SIGTERM)  # the shell and the stage it started (or its warm child)
        if warm is not None:
            warm.terminate()  # its socket is removed as it exits

    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    if failed is not None:
        out.write(f"lethe repro: stopped after a failure; {len(ran)} stages ran, not started: {', '.join(pending)}\n")
        return failed
    out.write(f"lethe repro: {len(ran)} stages ran, {len(order) - len(ran)} up to date, {jobs} at a time, "
              f"in {minutes} min {seconds} s\n")
    return 0
