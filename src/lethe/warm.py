"""A warm start for stages: one process imports what the stages import, and forks a child for each stage.

Every stage is a fresh process, and on a 2-core CPU importing torch, diffusers (which loads torch._dynamo,
peft and transformers with its U-Net), Lightning and MLflow takes about 10 s before any work: some 50
stages, 8 minutes of a pipeline. The server imports all of it once and waits on a Unix socket in the
project (`.lethe/warm-<host>.sock`). `lethe <stage>` hands it its arguments, working directory,
environment and standard streams; the server forks, and the child, which has imported everything
already, runs the stage exactly as `lethe <stage>` would, on the caller's terminal or log. Its exit code
comes back to the caller.

The server is started by `lethe repro` for its run, and by the first stage of a `dvc repro` for the next
ones (that stage runs as before); it exits `IDLE_SECONDS` after the last stage ended. `LETHE_WARM=0`
turns it all off. It never runs stale code or another setup: a stage is refused (it then runs in its
own process, as without a server, and the server exits) when any lethe source file or installed package
changed since the server started, when the caller is another environment or another copy of lethe, or
when a variable read at import time (PYTHON*, HF_*, TQDM_*, ...) differs. The server only imports, so it
holds no threads and no CUDA context when it forks. A child ends with its caller: a signal to the caller
is passed on, and a caller that is killed outright closes the connection, which ends the child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

from lethe.devices import RANK_VARIABLES

SWITCH = "LETHE_WARM"  # "0": no server; anything else (or unset): use one, start one if none listens
IDLE_SECONDS = 120.0  # after the last stage ended
POLL_SECONDS = 1.0
FIRST_REPLY_SECONDS = 300.0  # a server still importing on a loaded machine; past this the stage runs cold
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what the stages import when they run rather than at their top (kept out of their import path on purpose)
LAZY_IMPORTS = ("torchmetrics.image.fid", "matplotlib.pyplot", "lightning.pytorch", "optuna", "peft",
                "transformers.models.clip", "sklearn.metrics", "mlflow.pyfunc", "threadpoolctl")
# variables the libraries read when they are imported: a caller whose values differ runs cold. The
# thread counts are not among them: the child sets torch's and the BLAS libraries' from OMP_NUM_THREADS.
IMPORT_TIME = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS_", "DIFFUSERS_", "TQDM_", "TORCH", "CUDA_",
               "OPENBLAS_", "KMP_", "LIGHTNING_", "PL_", "MPLBACKEND", "LD_")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def enabled() -> bool:
    """Not under LETHE_WARM=0, and not in a DDP worker (rank > 0 or any launcher's rank variable): those start cold."""
    return os.environ.get(SWITCH, "1") != "0" and not any(os.environ.get(name) for name in RANK_VARIABLES)


def socket_path(root: Path | None = None) -> Path:
    """The project's socket: under DVC_ROOT (DVC sets it for a stage) or here; one per host, so that nodes
    sharing a project folder on a network file system keep their own."""
    root = root or Path(os.environ.get("DVC_ROOT") or ".")
    return root / ".lethe" / f"warm-{socket.gethostname()}.sock"


def log_path(path: Path) -> Path:
    return path.with_suffix(".log")


def fingerprint() -> str:
    """What the imported code was built from: every lethe source file and the folders packages live in
    (installing or upgrading one changes its folder). Compared before every fork."""
    import lethe

    files = sorted(Path(lethe.__file__).parent.rglob("*.py"))
    stats = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    folders = sorted({p for p in sys.path if p and "site-packages" in p and Path(p).is_dir()})
    return json.dumps(stats + [(d, Path(d).stat().st_mtime_ns, 0) for d in folders])


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME)}


def setup() -> dict:
    """What a caller and the server must share for a child to be the process the caller would have been."""
    import lethe

    return {"prefix": sys.prefix, "package": lethe.__file__, "uid": os.getuid(),
            "environment": import_time_environment(dict(os.environ))}


# ------------------------------------------------------------------------------------------------ client
def run_warm(argv: list[str]) -> int | None:
    """Run `lethe <argv>` in a child of the project's server; its exit code, or None where no server could
    take it (the caller then runs the stage itself), after starting one for the stages that come next."""
    if not enabled():
        return None
    path = socket_path()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
        _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():  # someone else's server: it would get this environment and terminal
            connection.close()
            return None
    except OSError:
        connection.close()
        start_server(IDLE_SECONDS, path)
        return None
    with connection:
        request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ), **setup()}
        try:
            socket.send_fds(connection, [b"L"], [0, 1, 2])
            connection.sendall(json.dumps(request).encode() + b"\n")
            connection.settimeout(FIRST_REPLY_SECONDS)
            replies = connection.makefile("r")
            first = replies.readline().split()
            connection.settimeout(None)
        except OSError:  # a timeout too: a child forked later finds the connection closed and never runs
            return None
        if not first or first[0] != "PID":  # refused, or the server went away
            return None
        child, signalled = int(first[1]), []

        def pass_on(number, _frame):
            signalled.append(number)
            try:
                os.kill(child, number)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, pass_on) for s in FORWARDED}
        try:
            code = next((int(line.split()[1]) for line in replies if line.startswith("EXIT ")), None)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if signalled:  # the shell's code for the signal, as if it had ended us
        return 128 + signalled[-1]
    if code is None:
        print("lethe: error: the stage's process ended without an exit code (killed?)", file=sys.stderr)
        return 1
    return code


def start_server(idle: float, path: Path) -> subprocess.Popen | None:
    """A server for this project in the background, its output in the log beside the socket; None where
    one cannot be started here (no writable .lethe/, or its imports failed on this very code)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if (path.with_suffix(".failed")).read_text() == fingerprint():
            return None  # the last server could not import this code; the stages run cold and say why
    except FileNotFoundError:
        pass
    except OSError:
        return None
    env = {k: v for k, v in os.environ.items() if k not in THREADS}
    with open(log_path(path), "a") as log:
        # -P: the project folder is not put on sys.path (its files must not shadow installed modules)
        return subprocess.Popen([sys.executable, "-P", "-m", "lethe.warm", str(path), str(idle)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


# ------------------------------------------------------------------------------------------------ server
def _listen(path: Path):
    """The listening socket and the lock that makes this the project's one server on this host (None, None
    if another holds it). Bound before the imports, so that a stage arriving meanwhile waits for them."""
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")  # held for the server's life; the kernel drops it at exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None, None
    path.unlink(missing_ok=True)  # a dead server's socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    except OSError as exc:  # e.g. a path longer than a socket name may be
        print(f"lethe warm: cannot listen on {path}: {exc}", flush=True)
        server.close()
        lock.close()
        return None, None
    os.chmod(path, 0o600)
    server.listen(16)
    return server, lock


def serve(path: Path, idle: float) -> None:
    import importlib
    import pkgutil

    server, lock = _listen(path)
    if server is None:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` removes the socket
    try:
        built, shared, started = fingerprint(), setup(), time.perf_counter()  # before the imports: an edit
        try:                                                                  # during them is seen as one
            import lethe.stages

            for module in pkgutil.iter_modules(lethe.stages.__path__):
                importlib.import_module(f"lethe.stages.{module.name}")
            for name in LAZY_IMPORTS:
                importlib.import_module(name)
        except Exception:
            path.with_suffix(".failed").write_text(built)
            raise
        import torch

        threads = torch.get_num_threads()
        print(f"lethe warm: {path} ready in {time.perf_counter() - started:.1f} s", flush=True)
        _accept(server, idle, built, shared, threads)
    finally:
        server.close()
        path.unlink(missing_ok=True)  # ours: we hold the lock
        lock.close()


def _accept(server: socket.socket, idle: float, built: str, shared: dict, threads: int) -> None:
    children, last = set(), time.monotonic()
    server.settimeout(POLL_SECONDS)
    while children or time.monotonic() - last < idle:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            for pid in list(children):  # reap the stages that ended; idle time counts from the last
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
                    last = time.monotonic()
            continue
        fds = []
        try:
            connection.settimeout(10)
            _, fds, _, _ = socket.recv_fds(connection, 1, 3)
            request = json.loads(connection.makefile("rb").readline())
            connection.settimeout(None)
        except (OSError, ValueError):  # the caller went away mid-request: nothing of it may stay open here
            for fd in fds:
                os.close(fd)
            connection.close()
            continue
        mine = {key: request.get(key) for key in shared} == shared
        why = None if mine and len(fds) == 3 else "another environment, copy of lethe, user or import-time variable"
        why = why or (None if fingerprint() == built else "lethe's code or the installed packages changed")
        if why:
            print(f"lethe warm: refused {request.get('argv')} ({why}), exiting", flush=True)
            for fd in fds:
                os.close(fd)
            connection.close()
            return
        pid = os.fork()
        if pid == 0:
            server.close()
            _child(connection, fds, request, threads)  # never returns
        for fd in fds:
            os.close(fd)
        connection.close()
        children.add(pid)
        last = time.monotonic()
        print(f"lethe warm: {' '.join(request['argv'])} runs as {pid}", flush=True)
    print(f"lethe warm: idle for {idle:.0f} s, exiting", flush=True)


def _child(connection: socket.socket, fds: list[int], request: dict, threads: int) -> None:
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
        become(request, threads)
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


def become(request: dict, threads: int) -> None:
    """The caller's directory, environment, command line, `__main__` and threads, in this process."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["argv0"], *request["argv"]]
    # `__main__` is the caller's script, not this module: Lightning's DDP launcher re-runs it for the
    # other ranks (with __spec__ None, as `python <script> args`)
    main_module = types.ModuleType("__main__")
    main_module.__file__, main_module.__spec__ = request["argv0"], None
    sys.modules["__main__"] = main_module
    _set_threads(threads)
    import numpy as np

    np.random.seed()  # a fresh process draws numpy's global state from entropy; so does each child


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


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]))
