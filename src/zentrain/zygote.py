"""A warm worker factory per node: restarted workers are forked, not started from scratch.

Measured on the 2-core dev machine, the largest part of a worker restart was not the
checkpoint load (tens of ms from the agent) but starting Python and importing torch and the
trainer: ~11 s at load 8 (2-3 s idle). So each node runs one **zygote**
(``python -m zentrain.zygote SOCKET``) that imports everything a worker needs once and
then waits. torch's elastic agent still starts and restarts "the workers" — but its entry
point is a 30-line stub (no torch import) that hands the zygote its argv, environment,
working directory and stdin/stdout/stderr (``SCM_RIGHTS``); the zygote forks, and the child
becomes the worker (``zentrain.train.main``). The stub relays signals to the worker and
exits with the worker's status (a worker killed by SIGKILL makes the stub die of SIGKILL),
so the elastic agent sees exactly what it would see without the zygote. A worker whose stub
disappears kills itself, so no worker outlives what the agent believes is running.

Fork safety: the zygote never runs a torch op (no intra-op thread pool exists when it
forks) and stays single-threaded (a select loop reaps children); each child re-seeds
``random``. Determinism does not change: the trainer sets its thread count explicitly and
everything numeric happens after the fork.

The trainer's data loader starts a ``forkserver`` (``zentrain.data.workers``), which costs
another interpreter start and torch import per restart. The zygote starts that forkserver
once, preloaded, and its children adopt it instead of starting their own (CPython 3.11's
``multiprocessing.forkserver`` keeps the server's pid and address in a module-level object
that forked children inherit; only its liveness check, a ``waitpid`` that a non-parent cannot
do, is replaced). Anything unexpected there falls back to the loader's own forkserver.

If the zygote is not running (or not yet listening) the stub simply execs
``python -m zentrain.train`` as before.

A worker that exits with code 2 (bad config or data) or 3 (non-finite loss) fails the same
way after every restart, so its stub leaves a ``fatal`` file next to the zygote's socket and
later stubs exit at once with that code instead of restarting the worker.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zentrain.ckpt.launch import term_with_parent
from zentrain.ckpt.shmdir import owner_id

# The stub the elastic agent runs (``python -u -c STUB SOCKET TRAIN_ARGS...``): stdlib only.
STUB = r"""
import json, os, signal, socket, struct, sys, time
path, args = sys.argv[1], sys.argv[2:]
fatal = os.path.join(os.path.dirname(path), "fatal")
if os.path.exists(fatal):
    code = int(open(fatal).read() or 1)
    print(f"[zentrain] not restarting the worker: it failed with exit code {code} (bad input "
          "or a non-finite loss), which a restart cannot fix", file=sys.stderr, flush=True)
    sys.exit(code)
def fallback():
    os.execv(sys.executable, [sys.executable, "-u", "-m", "zentrain.train", *args])
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        s.connect(path); break
    except OSError:
        if not os.path.exists(path + ".starting"):
            fallback()
        time.sleep(0.1)
else:
    fallback()
body = json.dumps({"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
socket.send_fds(s, [struct.pack(">I", len(body)) + body], [0, 1, 2])
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            os._exit(1)
        b += c
    return b
pid = struct.unpack(">q", recv(8))[0]
def relay(sig, frame):
    try:
        os.kill(pid, sig)
    except OSError:
        pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, relay)
status = struct.unpack(">q", recv(8))[0]
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
code = os.waitstatus_to_exitcode(status)
if code in (2, 3):  # the trainer's "bad input" / "non-finite loss": restarts cannot help
    with open(fatal, "w") as f:
        f.write(str(code))
sys.exit(code)
"""


def _preload() -> None:
    """Import what a worker imports (trainer, models, data, loader, DCP, evaluation)."""
    import torch  # noqa: F401

    import zentrain.train  # noqa: F401
    for name in ("zentrain.models", "zentrain.data", "zentrain.data.workers",
                 "zentrain.evaluation", "torch.distributed.checkpoint"):
        try:
            __import__(name)
        except ImportError:
            pass


def _start_loader_forkserver() -> bool:
    """Start the data loader's forkserver once, preloaded like the loader would."""
    try:
        import multiprocessing as mp
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["zentrain.data.workers", "zentrain.train"])
        forkserver.ensure_running()
        return forkserver._forkserver._forkserver_pid is not None
    except Exception as e:  # noqa: BLE001 - an optimisation only
        print(f"[zentrain zygote] no shared loader forkserver: {e}", file=sys.stderr)
        return False


def _adopt_loader_forkserver() -> None:
    """In a forked worker: use the zygote's forkserver (alive while the zygote lives)."""
    from multiprocessing import forkserver, resource_tracker

    srv = forkserver._forkserver
    if srv._forkserver_pid is None:
        return
    zygote = os.getppid()

    def ensure_running() -> None:
        resource_tracker.ensure_running()
        try:
            os.kill(zygote, 0)
        except OSError:
            raise RuntimeError("the zygote (and its loader forkserver) is gone") from None

    srv.ensure_running = ensure_running  # type: ignore[method-assign]


def _child(conn: socket.socket, req: dict, fds: list[int], shared_fs: bool) -> None:
    """The forked worker: become ``python -m zentrain.train ARGS`` and never return."""
    code = 1
    try:
        os.setsid()  # like torchrun's workers: a session of its own
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        import random
        import threading

        random.seed()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def watch_stub() -> None:  # the stub is the worker the elastic agent knows
            try:
                while conn.recv(1):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch_stub, daemon=True).start()
        if shared_fs:
            _adopt_loader_forkserver()
        import zentrain.train as train

        sys.argv = ["zentrain.train", *req["argv"]]
        sys.modules["__main__"] = train  # what `python -m zentrain.train` would have
        code = train.main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an uncaught exception would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve(path: str) -> int:
    """Preload, listen on ``path``, fork a worker per request until SIGTERM or the parent
    exits."""
    starting = Path(path + ".starting")
    starting.write_text(str(os.getpid()))  # the stub waits while this exists
    (Path(path).parent / "owner").write_text(owner_id(os.getpid()))
    try:
        _preload()
        shared_fs = _start_loader_forkserver()
        import gc

        gc.collect()
        gc.freeze()  # keep the preloaded heap shared copy-on-write with every worker
        Path(path).unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(64)
    finally:
        starting.unlink(missing_ok=True)
    parent = os.getppid()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    children: dict[int, socket.socket] = {}
    try:
        while not stop and os.getppid() == parent:
            ready, _, _ = select.select([srv], [], [], 0.05)
            if ready:
                conn, _ = srv.accept()
                try:
                    req, fds = _recv_request(conn)
                except (OSError, ValueError) as e:
                    print(f"[zentrain zygote] bad request: {e}", file=sys.stderr)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    for c in children.values():
                        c.close()
                    _child(conn, req, fds, shared_fs)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                _send(conn, pid)
            _reap(children)
    finally:
        srv.close()
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        shutil.rmtree(Path(path).parent, ignore_errors=True)
    return 0


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if len(msg) < 4:
        raise ValueError("short request")
    (n,) = struct.unpack(">I", msg[:4])
    body = msg[4:]
    while len(body) < n:
        more = conn.recv(n - len(body))
        if not more:
            raise ValueError("request cut short")
        body += more
    conn.settimeout(None)
    return json.loads(body), list(fds)


def _send(conn: socket.socket, value: int) -> None:
    try:
        conn.sendall(struct.pack(">q", value))
    except OSError:
        pass


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, status)
            conn.close()


class Zygote:
    """A zygote process started by a launcher (``Zygote.start``), in the launcher's network
    namespace; it exits with its parent. ``ZENTRAIN_ZYGOTE=0`` turns zygotes off."""

    def __init__(self, proc: subprocess.Popen, path: Path) -> None:
        self.proc, self.path = proc, path

    @classmethod
    def start(cls, name: str) -> Zygote | None:
        if os.environ.get("ZENTRAIN_ZYGOTE", "1") == "0":
            return None
        # AF_UNIX paths are limited to ~107 bytes: keep it short and out of the run dir.
        path = Path(tempfile.gettempdir()) / f"zt-{name}" / "zygote.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.starting").write_text("")  # stubs wait for the zygote from now on
        _sweep_stale(path.parent.parent)
        # SIGTERM when the launcher dies: the zygote stops its workers and removes its
        # directory (a SIGKILL would leave both behind).
        proc = subprocess.Popen([sys.executable, "-u", "-m", "zentrain.zygote", str(path)],
                                stdin=subprocess.DEVNULL, preexec_fn=term_with_parent())
        return cls(proc, path)

    def wait_ready(self, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.path.exists() and not Path(f"{self.path}.starting").exists():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def worker_args(self, train_args: list[str]) -> list[str]:
        """Arguments for ``sys.executable`` that start a worker through this zygote."""
        return ["-u", "-c", STUB, str(self.path), *train_args]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.path.parent, ignore_errors=True)


def _sweep_stale(root: Path) -> None:
    """Remove zygote directories whose zygote died without cleaning up."""
    for d in root.glob("zt-zentrain-*"):
        try:
            owner = (d / "owner").read_text().strip()
        except OSError:
            continue
        pid = owner.split()[0]
        if not (pid.isdigit() and owner_id(int(pid)) == owner):
            shutil.rmtree(d, ignore_errors=True)


_LIBC = None
try:  # resolved here, not in the forked child
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    pass


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the process that started it dies."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
