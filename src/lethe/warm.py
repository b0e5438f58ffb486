"""A warm start for stages: one process imports what the stages import, and forks a child for each stage.

Every stage is a fresh process, and on a 2-core CPU importing torch, diffusers (which loads torch._dynamo,
peft and transformers with its U-Net), Lightning and MLflow takes about 10 s before any work: some 50
stages, 8 minutes of a pipeline. The server imports all of it once and waits on a Unix socket in the
project (`.lethe/warm.sock`). `lethe <stage>` hands it its arguments, working directory, environment and
standard streams; the server forks, and the child, which has imported everything already, runs the stage
exactly as `lethe <stage>` would, on the caller's terminal or log. Its exit code comes back to the caller.

The server is started by `lethe repro` for its run, and by the first stage of a `dvc repro` for the next
ones (that stage runs as before); it exits `IDLE_SECONDS` after the last stage ended. `LETHE_WARM=0`
turns it all off. It never runs stale code: a stage is refused (and runs in its own process, as without a server)
when any lethe source file or installed package changed since the server started, or when the caller's
Python is another one. The server only imports, so it holds no threads and no CUDA context when it forks.
A child ends with its caller: a signal to the caller is passed on, and a caller that is killed outright
closes the connection, which ends the child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SOCKET = Path(".lethe/warm.sock")
LOG = Path(".lethe/warm.log")
SWITCH = "LETHE_WARM"  # "0": no server; anything else (or unset): use one, start one if none listens
IDLE_SECONDS = 120.0  # after the last stage ended
POLL_SECONDS = 1.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what the stages import when they run rather than at their top (kept out of their import path on purpose)
LAZY_IMPORTS = ("torchmetrics.image.fid", "matplotlib.pyplot", "lightning.pytorch", "optuna", "peft",
                "transformers.models.clip", "sklearn.metrics", "mlflow.pyfunc")


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0" and not os.environ.get("LOCAL_RANK")  # DDP workers start cold


def fingerprint() -> str:
    """What the imported code was built from: every lethe source file and the folders packages live in
    (installing or upgrading one changes its folder). Compared before every fork."""
    import lethe

    package = Path(lethe.__file__).parent
    files = sorted(package.rglob("*.py"))
    stats = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    folders = sorted({str(Path(p)) for p in sys.path if p and Path(p).is_dir() and "site-packages" in p})
    stats += [(d, Path(d).stat().st_mtime_ns, 0) for d in folders]
    return json.dumps(stats)


# ------------------------------------------------------------------------------------------------ client
def run_warm(argv: list[str]) -> int | None:
    """Run `lethe <argv>` in a child of the project's server; its exit code, or None where no server could
    take it (the caller then runs the stage itself), after starting one for the stages that come next."""
    if not enabled():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(SOCKET))
    except OSError:
        connection.close()
        start_server(IDLE_SECONDS)
        return None
    with connection:
        import lethe

        request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
                   "prefix": sys.prefix, "package": lethe.__file__}
        try:
            socket.send_fds(connection, [b"L"], [0, 1, 2])
            connection.sendall(json.dumps(request).encode() + b"\n")
            replies = connection.makefile("r")
            first = replies.readline().split()
        except OSError:
            return None
        if not first or first[0] != "PID":  # refused: changed code, another Python, or the server went away
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
            for line in replies:
                if line.startswith("EXIT "):  # after a signal, the shell's code for it, as if it had ended us
                    return 128 + signalled[-1] if signalled else int(line.split()[1])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if signalled:
        return 128 + signalled[-1]
    print("lethe: error: the stage's process ended without an exit code (killed?)", file=sys.stderr)
    return 1


def start_server(idle: float, socket_path: Path = SOCKET) -> subprocess.Popen | None:
    """A server for this project in the background, its output in `.lethe/warm.log`; None where one cannot
    be started here (no writable .lethe/)."""
    try:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(socket_path.parent / LOG.name, "a")
    except OSError:
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with log:
        # -P: the project folder is not put on sys.path (its files must not shadow installed modules)
        return subprocess.Popen([sys.executable, "-P", "-m", "lethe.warm", str(socket_path), str(idle)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


# ------------------------------------------------------------------------------------------------ server
def _listen(path: Path) -> socket.socket | None:
    """The listening socket, bound before the imports so that a stage arriving meanwhile waits for them
    instead of starting a second server; None if another server already listens there."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))  # someone listens: leave it be
            probe.close()
            server.close()
            return None
        except OSError:
            path.unlink(missing_ok=True)  # a dead server's socket file
            server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(16)
    return server


def serve(path: Path, idle: float) -> None:
    import importlib
    import pkgutil

    import lethe
    import lethe.stages

    server = _listen(path)
    if server is None:
        return
    inode, started = path.stat().st_ino, time.perf_counter()
    for module in pkgutil.iter_modules(lethe.stages.__path__):
        importlib.import_module(f"lethe.stages.{module.name}")
    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import torch

    threads, built = torch.get_num_threads(), fingerprint()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` removes the socket
    print(f"lethe warm: {path} ready in {time.perf_counter() - started:.1f} s", flush=True)
    children, last = set(), time.monotonic()
    server.settimeout(POLL_SECONDS)
    try:
        while children or time.monotonic() - last < idle:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                for pid in list(children):  # reap the stages that ended; idle time counts from the last
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        children.discard(pid)
                        last = time.monotonic()
                continue
            connection.settimeout(10)
            try:
                _, fds, _, _ = socket.recv_fds(connection, 1, 3)
                request = json.loads(connection.makefile("rb").readline())
            except (OSError, ValueError):
                connection.close()
                continue
            connection.settimeout(None)
            why = ("another Python environment or lethe" if (request["prefix"], request["package"]) != (sys.prefix, lethe.__file__)
                   else "changed code or packages" if fingerprint() != built else None)
            if why or len(fds) != 3:
                print(f"lethe warm: refused {request['argv']} ({why}), exiting", flush=True)
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
    finally:
        server.close()
        try:
            if path.stat().st_ino == inode:  # not a newer server's socket
                path.unlink()
        except OSError:
            pass


def _child(connection: socket.socket, fds: list[int], request: dict, threads: int) -> None:
    """Become `lethe <argv>` run by the caller: its streams, directory, environment, threads."""
    code = 1
    try:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["argv0"], *request["argv"]]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
        connection.sendall(f"PID {os.getpid()}\n".encode())  # first, so that nothing overtakes it
        threading.Thread(target=_end_with_caller, args=(connection,), daemon=True).start()
        from lethe.cli import main

        code = main(request["argv"])
    except SystemExit as exc:  # argparse: --help, a usage error
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            connection.sendall(f"EXIT {code}\n".encode())
        except OSError:
            pass
        os._exit(code)


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
