"""An opt-in warm start for stages (`LETHE_WARM=1`): one process imports what the stages import, and forks
a child for each stage.

Every stage is a fresh process, and on a 2-core CPU importing torch, diffusers (which loads torch._dynamo,
peft and transformers with its U-Net), Lightning and MLflow takes seconds before any work. The server
imports all of it once and waits on a Unix socket in the project (`.lethe/warm-<host>.sock`, the folder
0700). `lethe <stage>` hands it its arguments, working directory, environment, process state (umask,
ignored signals, CPU affinity, nice, resource limits) and standard streams; the server forks, and the
child, which has imported everything already, runs the stage as `lethe <stage>` would, on the caller's
terminal or log. Its exit code comes back to the caller.

Off by default: `dvc repro` runs every stage as an ordinary process. A forked child is not a fresh process
in ways no check can close (what `time`, `getrusage` and cgroup accounting see; the name `ps` shows), and
the time it saves is small beside a pipeline's (docs/warm-start.md has the measured figure). With
`LETHE_WARM=1` the first stage of a `dvc repro` (or `lethe repro`) starts a server for the next ones; it
exits `IDLE_SECONDS` after the last stage ended.

A request is refused alone (the stage then runs in its own process) when it comes from another user (the
peer's credentials, checked by the server) or another environment: every variable but a short list that
differs per stage (`VOLATILE`) must equal the server's. The server exits when any file of a module it has
imported, any lethe source file or an installed package's folder changed since it started. The child
re-applies the variables the server's imports set, reseeds torch and numpy as a fresh process would, and
holds no lock or CUDA context. A child ends with its caller: a signal to the caller is passed on (unless
the caller ignores it), and a caller that is killed outright closes the connection, which ends the child.
Anything that cannot be set up (no writable, private `.lethe/`, no peer credentials on this platform)
makes the stage run cold. What the child does to become the caller's process is `lethe.warm_child`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from lethe.devices import RANK_VARIABLES
from lethe.progress import CORES_FILE
from lethe.warm_child import child, process_state

SWITCH = "LETHE_WARM"  # "1": use a server, start one if none listens; anything else (or unset): none
IDLE_SECONDS = 120.0  # after the last stage ended
POLL_SECONDS = 1.0
FIRST_REPLY_SECONDS = 300.0  # a server still importing on a loaded machine; past this the stage runs cold
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what the stages import when they run rather than at their top (kept out of their import path on purpose)
LAZY_IMPORTS = ("torchmetrics.image.fid", "matplotlib.pyplot", "lightning.pytorch", "optuna", "peft",
                "transformers.models.clip", "sklearn.metrics", "mlflow.pyfunc", "threadpoolctl")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# the variables that may differ between the server's environment and a caller's: set per stage by DVC, the
# shell or `lethe repro` (its cores file), or applied by the child itself (threads). Every other variable must be equal, or the stage runs cold.
VOLATILE = ("DVC_", "PWD", "OLDPWD", "SHLVL", "_", "LINES", "COLUMNS", SWITCH, CORES_FILE, *THREADS)


def enabled() -> bool:
    """Under LETHE_WARM=1, on a platform that gives a socket's peer credentials (the server checks them: without
    them it would refuse every stage), and not in a DDP worker (rank > 0 or any launcher's rank variable)."""
    return (os.environ.get(SWITCH) == "1" and hasattr(socket, "SO_PEERCRED")
            and not any(os.environ.get(name) for name in RANK_VARIABLES))


def socket_path(root: Path | None = None) -> Path:
    """The project's socket: under DVC_ROOT (DVC sets it for a stage) or here; one per host, so that nodes
    sharing a project folder on a network file system keep their own."""
    root = root or Path(os.environ.get("DVC_ROOT") or ".")
    return root / ".lethe" / f"warm-{socket.gethostname()}.sock"


def log_path(path: Path) -> Path:
    return path.with_suffix(".log")


def _stat(path: str | Path) -> tuple[str, int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (str(path), -1, -1)
    return (str(path), info.st_mtime_ns, info.st_size)


def fingerprint(modules: bool = True) -> str:
    """What the imported code was built from: every lethe source file and the folders packages live in
    (installing one changes its folder); with `modules`, also every file of a module imported so far (an
    in-place edit of an installed package, another editable install, a PYTHONPATH folder) and every folder
    on sys.path. The server compares it before every fork."""
    import lethe

    files = {str(f) for f in Path(lethe.__file__).parent.rglob("*.py")}
    folders = {p for p in sys.path if p and "site-packages" in p and Path(p).is_dir()}
    if modules:
        files |= {f for m in list(sys.modules.values()) if isinstance(f := getattr(m, "__file__", None), str)}
        folders |= {p for p in sys.path if p and Path(p).is_dir()}
    return json.dumps([_stat(f) for f in sorted(files)] + [_stat(d) for d in sorted(folders)])


def comparable(env: dict[str, str]) -> dict[str, str]:
    """The variables a caller and the server must agree on: all but the VOLATILE ones."""
    return {k: v for k, v in env.items() if not (k.startswith(VOLATILE[0]) or k in VOLATILE[1:])}


def setup() -> dict:
    """What a caller and the server must share for a child to be the process the caller would have been."""
    import lethe

    return {"prefix": sys.prefix, "package": lethe.__file__, "environment": comparable(dict(os.environ))}


def peer_uid(connection: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket; None where the platform cannot say."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


def private_folder(folder: Path) -> bool:
    """`.lethe/` made 0700 where missing (closed to others where it is ours and open); usable only when it is
    a real folder (not a link), ours, and closed to others."""
    import stat

    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(folder, stat.S_IMODE(info.st_mode) & 0o700)
            info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


# ------------------------------------------------------------------------------------------------ client
def run_warm(argv: list[str]) -> int | None:
    """Run `lethe <argv>` in a child of the project's server; its exit code, or None where no server could
    take it (the caller then runs the stage itself), after starting one for the stages that come next."""
    if not enabled():
        return None
    path = socket_path()
    if not private_folder(path.parent):
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        start_server(IDLE_SECONDS, path)
        return None
    if peer_uid(connection) != os.getuid():  # someone else's server, or no way to tell: it would get our terminal
        connection.close()
        return None
    with connection:
        request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ), **setup(),
                   "state": process_state()}
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

        # an ignored signal stays ignored (the child ignores it too): `nohup lethe train` outlives its terminal
        previous = {s: signal.signal(s, pass_on) for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN}
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


def start_server(idle: float, path: Path, environment: dict[str, str] | None = None) -> subprocess.Popen | None:
    """A server for this project in the background, its output in the log beside the socket; None where
    one cannot be started here (no writable .lethe/, or its imports failed on this very code)."""
    if not private_folder(path.parent):
        return None
    try:
        if (path.with_suffix(".failed")).read_text() == fingerprint(modules=False):
            return None  # the last server could not import this code; the stages run cold and say why
    except FileNotFoundError:
        pass
    except OSError:
        return None
    env = {k: v for k, v in (os.environ if environment is None else environment).items() if k not in THREADS}
    try:
        log = os.open(log_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        # -P: the project folder is not put on sys.path (its files must not shadow installed modules)
        return subprocess.Popen([sys.executable, "-P", "-m", "lethe.warm", str(path), str(idle)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    except OSError:
        return None
    finally:
        os.close(log)


# ------------------------------------------------------------------------------------------------ server
def _listen(path: Path):
    """The listening socket and the lock that makes this the project's one server on this host (None, None
    if another holds it). Bound before the imports, so that a stage arriving meanwhile waits for them."""
    import fcntl

    try:  # held for the server's life; the kernel drops it at exit (children close their copy)
        lock = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None, None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None, None
    path.unlink(missing_ok=True)  # a dead server's socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
    except OSError as exc:  # e.g. a path longer than a socket name may be
        print(f"lethe warm: cannot listen on {path}: {exc}", flush=True)
        server.close()
        os.close(lock)
        return None, None
    os.chmod(path, 0o600)
    server.listen(16)
    return server, lock


def serve(path: Path, idle: float) -> None:
    import importlib
    import pkgutil

    if not private_folder(path.parent):
        print(f"lethe warm: {path.parent} is not a private folder of this user; no server", flush=True)
        return
    server, lock = _listen(path)
    if server is None:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` removes the socket
    try:
        before = dict(os.environ)
        built, shared, started = fingerprint(), setup(), time.perf_counter()  # before the imports: an edit
        try:                                                                  # during them is seen as one
            import lethe.stages

            for module in pkgutil.iter_modules(lethe.stages.__path__):
                importlib.import_module(f"lethe.stages.{module.name}")
            for name in LAZY_IMPORTS:
                importlib.import_module(name)
        except Exception:
            path.with_suffix(".failed").write_text(fingerprint(modules=False))
            raise
        import torch

        threads = torch.get_num_threads()
        imported = {k: v for k, v in os.environ.items() if before.get(k) != v}  # what the imports set
        code = fingerprint()  # now over every imported module's file as well
        if not _same_files(built, code):
            print("lethe warm: code changed during the imports, exiting", flush=True)
            return
        print(f"lethe warm: {path} ready in {time.perf_counter() - started:.1f} s", flush=True)
        _accept(server, idle, code, shared, threads, imported, lock)
    finally:
        server.close()
        path.unlink(missing_ok=True)  # ours: we hold the lock
        os.close(lock)


def _same_files(first: str, second: str) -> bool:
    """Whether every file in the first fingerprint has the same stat in the second."""
    later = {row[0]: row for row in json.loads(second)}
    return all(later.get(row[0], row) == row for row in json.loads(first))


def _accept(server: socket.socket, idle: float, built: str, shared: dict, threads: int, imported: dict,
            lock: int) -> None:
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
        stale = fingerprint() != built
        why = ("another user" if peer_uid(connection) != os.getuid()
               else _differences(request, shared) or ("" if len(fds) == 3 else "no standard streams"))
        if why or stale:
            why = why or "lethe's code or an imported module's file changed since the server started"
            print(f"lethe warm: refused {request.get('argv')} ({why}){', exiting' if stale else ''}", flush=True)
            for fd in fds:
                os.close(fd)
            connection.close()
            if stale:
                return
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            os.close(lock)  # a long stage must not keep the next server from starting
            child(connection, fds, request, threads, imported)  # never returns
        for fd in fds:
            os.close(fd)
        connection.close()
        children.add(pid)
        last = time.monotonic()
        print(f"lethe warm: {' '.join(request['argv'])} runs as {pid}", flush=True)
    print(f"lethe warm: idle for {idle:.0f} s, exiting", flush=True)


def _differences(request: dict, shared: dict) -> str:
    """Why a caller is not the setup the server imported for ("" when it is): the copy of lethe, its
    environment, or the variables that differ (their names only)."""
    for key in ("prefix", "package"):
        if request.get(key) != shared[key]:
            return f"another {'environment' if key == 'prefix' else 'copy of lethe'}"
    theirs, ours = request.get("environment") or {}, shared["environment"]
    names = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return f"variables differ: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" if names else ""


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]))
