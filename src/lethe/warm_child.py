"""What a warm server's forked child does to become the process `lethe <stage>` would have been: the
caller's process state (captured by the client with `process_state`), its directory, environment,
command line, `__main__`, threads and a fresh process's random state (`become`), then the stage, ended as a
process ends (`child`). The server and its checks are `lethe.warm`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import types

# the caller's ignored signals that the child must ignore too (`nohup lethe train ...`)
IGNORABLE = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def process_state() -> dict:
    """The caller's state that a forked child would otherwise take from the server."""
    import resource

    umask = os.umask(0)
    os.umask(umask)
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}
    return {"umask": umask, "nice": os.nice(0), "limits": limits,
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ignored": [int(s) for s in IGNORABLE if signal.getsignal(s) is signal.SIG_IGN]}


def child(connection: socket.socket, fds: list[int], request: dict, threads: int, imported: dict) -> None:
    """Become `lethe <argv>` run by the caller: its streams, directory, environment, threads; then end as
    that process would (exit handlers, logging), and only then tell the caller the exit code."""
    code, ran = 1, False
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        try:
            become(request, threads, imported)
        except Exception:  # noqa: BLE001 (a state it cannot take: no PID goes back, and the caller runs cold)
            os._exit(1)
        connection.sendall(f"PID {os.getpid()}\n".encode())  # first, so that nothing overtakes it
        threading.Thread(target=_end_with_caller, args=(connection,), daemon=True).start()
        from lethe.cli import main

        ran = True
        code = main(request["argv"])
    except SystemExit as exc:  # argparse: --help, a usage error
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        if ran:
            _shut_down()
        try:
            connection.sendall(f"EXIT {code}\n".encode())
        except OSError:
            pass
        os._exit(code)


def become(request: dict, threads: int, imported: dict | None = None) -> None:
    """The caller's directory, environment (with what the server's imports set, as the caller's own imports
    would have), process state, command line, `__main__`, threads and a fresh process's random state."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**(imported or {}), **request["env"]})
    _take_state(request.get("state"))
    sys.argv = [request["argv0"], *request["argv"]]
    # `__main__` is the caller's script, not this module: Lightning's DDP launcher re-runs it for the
    # other ranks (with __spec__ None, as `python <script> args`)
    main_module = types.ModuleType("__main__")
    main_module.__file__, main_module.__spec__ = request["argv0"], None
    sys.modules["__main__"] = main_module
    _set_threads(threads)
    import numpy as np
    import torch

    np.random.seed()  # a fresh process draws numpy's global state from entropy; so does each child
    torch.manual_seed(torch.initial_seed())  # and starts torch's from its fixed default, not the server's state


def _take_state(state: dict | None) -> None:
    """The caller's umask, ignored signals, CPU affinity, nice and resource limits. One that cannot be
    taken (a limit above the server's hard limit) raises: the child then ends, and the caller runs cold."""
    if not state:
        return
    import resource

    os.umask(state["umask"])
    for number in state["ignored"]:
        signal.signal(number, signal.SIG_IGN)
    if state.get("affinity") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, state["affinity"])
    if state["nice"] != os.nice(0):
        os.nice(state["nice"] - os.nice(0))
    for name, limits in state["limits"].items():
        if hasattr(resource, name) and tuple(limits) != resource.getrlimit(getattr(resource, name)):
            resource.setrlimit(getattr(resource, name), tuple(limits))


def _set_threads(default: int) -> None:
    """torch's and the BLAS libraries' threads as a fresh process given the caller's OMP_NUM_THREADS sets
    them (the server started without it, at each library's default)."""
    import threadpoolctl
    import torch

    try:
        count = max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
    except (KeyError, ValueError):
        torch.set_num_threads(default)
        return
    torch.set_num_threads(count)
    threadpoolctl.threadpool_limits(count, user_api="blas")


def _shut_down() -> None:
    """What a process does when `main` returns: non-daemon threads joined, exit handlers (MLflow ends its
    run and flushes its logging there), logging closed, streams flushed."""
    import atexit
    import logging

    for step in (threading._shutdown, atexit._run_exitfuncs, logging.shutdown, sys.stdout.flush, sys.stderr.flush):
        try:
            step()
        except Exception:  # noqa: BLE001 (as at exit: one failing handler does not stop the rest)
            pass


def _end_with_caller(connection: socket.socket) -> None:
    """The caller never writes after its request: end of stream means it is gone (killed outright)."""
    try:
        while connection.recv(1024):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
