"""Background batch building: worker processes, shared-memory slots, restart on death.

The training process keeps ``prefetch`` batch **slots**: one shared-memory tensor per batch
field, sized for this rank's samples of one step. Step ``s`` goes to worker ``s % N`` with a
free slot; the worker computes the step's global batch from its own copy of the planner
(the plan is a pure function of the loader state, so only the state is ever sent), reads
this rank's slice from its own opened sources straight into the slot, and answers with
the step's digest and mixture. The trainer takes steps strictly in order; taking one
copies it out of its slot, which frees the slot for step ``s + prefetch``.

Failure handling (OVERLORD's "shadow loader", systems.md §2.1, made cheap by determinism):
the pool waits on each worker's pipe *and* its process sentinel. When a worker dies
(killed, OOM, segfault) it is restarted from the loader state and given again every step
it owned whose result had not arrived, into the same slots; nothing else needs
recovering, because a step's samples depend on (seed, state, step) only, so the rebuilt
batch is the one the dead worker would have produced. A warning names the worker, its exit
code and the steps rebuilt. A worker that keeps dying on the same step is an error.

Workers come from a ``forkserver`` (never ``fork`` from a process whose torch thread pools
are running), preloaded with this module, so a restart costs a fork, not a torch import.
Each worker uses one thread and ignores SIGINT (Ctrl-C stops the trainer, which stops
them); when the trainer dies, its pipes close and the workers exit.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import select
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zentrain.data.corpus import DataError, log
from zentrain.data.plan import LoaderState, MixSchedule, Planner, batch_digest
from zentrain.data.sources import build_batch

MAX_DEATHS_PER_STEP = 3
"""A step whose worker died this many times is not retried again."""
STALL_TIMEOUT_S = 600.0
"""A live worker that answers nothing for this long is reported as hung."""
POLL_MAX_S = 0.005
"""Longest sleep of an idle worker between looks at its inbox (its pickup latency)."""
MEMORY_EVERY_S = 5.0
"""Workers measure their private memory this often (reading smaps_rollup is not free)."""


@dataclass(frozen=True)
class PlanSpec:
    """What a worker needs to plan any step (with a ``LoaderState``): picklable."""

    sizes: tuple[int, ...]
    schedule: MixSchedule
    seed: int
    rank: int
    world: int

    def planner(self, state: LoaderState) -> Planner:
        return Planner(list(self.sizes), self.schedule, self.seed, state)


@dataclass
class StepResult:
    batch: dict[str, Tensor]
    """This rank's samples of the step (all micro-batches), copied out of the slot."""
    digest: str
    """``batch_digest`` of the step's global batch."""
    counts: list[int]
    """Samples per source in the step's global batch."""
    ready: Any = None
    """CUDA: the event the batch's host-to-device copy records (``device.py``); None: the
    batch is usable now."""


# A forkserver child re-runs the main module by name (spawn semantics); since the server
# preloaded it (see ``_context``), runpy warns once per worker that it is already imported.
# Harmless, and only that message is silenced (the filter is inherited from the server).
warnings.filterwarnings("ignore", message=r"'.*' found in sys.modules after import of package",
                        category=RuntimeWarning)


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    # The server imports these once and every worker inherits them. The main module's
    # imports too: each child re-runs the main module (as spawn does), and for the trainer
    # (zentrain.train: torch.distributed, the models) importing that in every worker costs
    # ~100 MB of private memory. Preloading it *by name* in the server makes the child's
    # re-run find everything imported. (The documented "__main__" entry does not work on
    # Python 3.11: the server is never told the main path.)
    preload = ["zentrain.data.workers"]
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name and not name.endswith("__main__"):
        preload.append(name)
    ctx.set_forkserver_preload(preload)
    return ctx


def _worker_main(wid: int, incarnation: int, recipes: list[Any], spec: PlanSpec,
                 state: LoaderState, slots: list[dict[str, Tensor]], conn: mpc.Connection,
                 crash_at: tuple[int, int] | None) -> None:
    # Everything inherited from the forkserver is shared copy-on-write until a full garbage
    # collection writes to every object's header; freezing keeps those pages shared
    # (~100 MB of private memory per worker otherwise).
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        readers = [r.open() for r in recipes]
        planner = spec.planner(state)
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises
        _put(conn, ("error", -1, _message(e, wid, "opening the sources")))
        return
    views = [{k: t.numpy() for k, t in slot.items()} for slot in slots]
    per = planner.global_batch_size // spec.world
    memory, measured = _private_bytes(os.getpid()), time.monotonic()
    idle = 0
    while True:
        try:
            # Poll with short sleeps instead of blocking in recv: a blocked reader is woken
            # by the trainer's write, and on a busy machine the scheduler then often runs the
            # woken worker on the trainer's CPU at once (wake-up preemption), so each task
            # sent would stall the trainer for a batch's worth of work (measured: ~6 ms a
            # step on DeepFM). A sleeping worker is not woken; it finds the task within
            # POLL_MAX_S.
            while not conn.poll():
                idle = min(idle + 1, 50)
                time.sleep(min(POLL_MAX_S, 0.0002 * idle))
            idle = 0
            msg = _take(conn)
        except (EOFError, OSError):  # the trainer is gone
            return
        if msg is None:
            return
        if msg[0] == "reset":
            planner.reset(msg[1])
            per = planner.global_batch_size // spec.world
            continue
        _, step, slot = msg
        if crash_at is not None and step == crash_at[0] and incarnation < crash_at[1]:
            os._exit(77)  # test hook: die with this step in flight
        try:
            ids = planner.global_ids(step)
            build_batch(readers, ids[spec.rank * per:(spec.rank + 1) * per], views[slot])
            counts = np.bincount(ids[:, 0], minlength=len(spec.sizes)).tolist()
            _put(conn, ("ok", step, slot, batch_digest(ids), counts, memory))
            # Memory is measured after the batch went out (it is reported with the next
            # one), and only every few seconds: reading smaps_rollup costs 10-30 ms.
            if time.monotonic() - measured > MEMORY_EVERY_S:
                memory, measured = _private_bytes(os.getpid()), time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported to the trainer, which raises
            _put(conn, ("error", step, _message(e, wid, f"building step {step}")))


def _put(conn: mpc.Connection, msg: Any) -> None:
    """Send ``msg`` with plain pickle: the messages are small tuples of plain data, and
    ``Connection.send``'s reducer-aware pickler costs ~50 us each on the trainer's path."""
    conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))


def _take(conn: mpc.Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _message(e: Exception, wid: int, doing: str) -> str:
    if isinstance(e, DataError):
        return str(e)
    return f"data worker {wid} failed {doing}:\n{traceback.format_exc()}"


@dataclass
class _Worker:
    proc: Any
    conn: mpc.Connection
    incarnation: int
    poller: Any = None
    """A ``select.poll`` on ``conn``: a readiness check in one C call (``conn.poll`` builds a
    selector every time, ~10x the cost, and this runs on the trainer's critical path)."""

    def __post_init__(self) -> None:
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLIN)


@dataclass
class _Task:
    step: int
    slot: int
    worker: int


class WorkerPool:
    """``num_workers`` processes building this rank's batches ``prefetch`` steps ahead."""

    def __init__(self, recipes: list[Any], spec: PlanSpec, state: LoaderState,
                 layout: dict[str, tuple[tuple[int, ...], np.dtype]], num_workers: int,
                 prefetch: int, crash_at: tuple[int, int] | None = None,
                 stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
        if num_workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.recipes, self.spec, self.crash_at = recipes, spec, crash_at
        self.prefetch, self.stall_timeout_s = prefetch, stall_timeout_s
        rows = state.global_batch_size // spec.world
        self.slots = [{k: torch.from_numpy(np.zeros((rows, *shape), dtype)).share_memory_()
                       for k, (shape, dtype) in layout.items()} for _ in range(prefetch)]
        self.free = list(range(prefetch))
        self.tasks: dict[int, _Task] = {}
        self.done: dict[int, tuple[int, str, list[int]]] = {}
        self.deaths: dict[int, int] = {}
        self.restarts = 0
        self.closing = False
        """Set from another thread to make a ``get`` in flight give up (within a second)."""
        self.memory = [0] * num_workers  # each worker's last reported private bytes
        self.anchor = state
        self.expect = self.next_submit = state.step
        self.ctx = _context()
        self.workers: list[_Worker] = [self._spawn(w, 0) for w in range(num_workers)]

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, wid: int, incarnation: int) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_worker_main, name=f"zentrain-data-{wid}", daemon=True,
            args=(wid, incarnation, self.recipes, self.spec, self.anchor, self.slots, child,
                  self.crash_at))
        proc.start()
        child.close()  # only the worker holds its end: its death closes the pipe
        return _Worker(proc, parent, incarnation)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def _restart(self, wid: int) -> None:
        old = self.workers[wid]
        old.proc.join(timeout=5)
        code = old.proc.exitcode
        old.conn.close()
        lost = sorted(t.step for t in self.tasks.values() if t.worker == wid)
        for s in lost:
            self.deaths[s] = self.deaths.get(s, 0) + 1
            if self.deaths[s] >= MAX_DEATHS_PER_STEP:
                raise DataError(f"data worker {wid} died {self.deaths[s]} times while building "
                                f"step {s} (last exit code {code}); giving up")
        self.workers[wid] = self._spawn(wid, old.incarnation + 1)
        self.restarts += 1
        log.warning(f"data worker {wid} (pid {old.proc.pid}) died with exit code {code}; "
                    f"restarted it and rebuilding its steps {lost} from the loader state")
        for s in lost:
            _put(self.workers[wid].conn, ("task", s, self.tasks[s].slot))

    # -- steps -------------------------------------------------------------------------------
    def _fill(self) -> None:
        while self.free and self.next_submit < self.expect + self.prefetch:
            s = self.next_submit
            task = _Task(s, self.free.pop(), s % len(self.workers))
            self.tasks[s] = task
            try:
                _put(self.workers[task.worker].conn, ("task", s, task.slot))
            except OSError:  # it died: noticed on its pipe, restarted, given its tasks again
                pass
            self.next_submit += 1

    def _receive(self, wid: int, timeout: float) -> None:
        """Take what worker ``wid`` sent within ``timeout``; restart it if it died."""
        w = self.workers[wid]
        if not w.poller.poll(0):
            ready = mpc.wait([w.conn, w.proc.sentinel], timeout)
            if not ready:
                return
            if w.proc.sentinel in ready and not w.proc.is_alive():
                self._drain(w)
                self._restart(wid)
                return
        # Only the worker holds the other end of the pipe, so end of file is its death:
        # no process-table lookup on every batch (it cost ~60 us on the critical path).
        if self._drain(w) and not w.proc.is_alive():
            self._restart(wid)

    def _drain(self, w: _Worker) -> bool:
        """Handle every message waiting on ``w``'s pipe; True at end of file."""
        try:
            while w.poller.poll(0):  # also true at end of file: recv then raises
                self._handle(_take(w.conn))
        except (EOFError, OSError):
            return True
        return False

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "error":
            raise DataError(msg[2])
        _, step, slot, digest, counts, memory = msg
        task = self.tasks.pop(step)
        self.memory[task.worker] = memory
        assert task.slot == slot, (task, slot)
        self.done[step] = (slot, digest, counts)

    def get(self, step: int, reset_state: LoaderState | None = None,
            out: dict[str, Tensor] | None = None) -> StepResult:
        """The batch of ``step``. Steps come in order; ``reset_state`` (the state at
        ``step``) is needed only when ``step`` is not the one after the previous call.
        The batch is copied out of its slot into ``out`` (e.g. a pinned buffer) or a new
        tensor; the slot is handed to the next step only after that copy."""
        if step != self.expect:
            if reset_state is None or reset_state.step != step:
                raise ValueError(f"step {step} out of order (expected {self.expect}) and no "
                                 "state to restart from")
            self._reset(reset_state)
        self._fill()
        task = self.tasks.get(step)
        last = time.monotonic()
        while step not in self.done:
            assert task is not None
            if self.closing:
                raise DataError("the loader was closed while it waited for a batch")
            before = (len(self.done), self.restarts)
            self._receive(task.worker, 1.0)
            if (len(self.done), self.restarts) != before:
                last = time.monotonic()
            elif time.monotonic() - last > self.stall_timeout_s:
                raise DataError(f"data worker {task.worker} built nothing for "
                                f"{self.stall_timeout_s:.0f} s (step {step}); is it hung?")
        slot, digest, counts = self.done.pop(step)
        src = self.slots[slot]
        batch = ({k: v.clone() for k, v in src.items()} if out is None else
                 {k: out[k].copy_(v) for k, v in src.items()})
        self.free.append(slot)  # after the copy (synchronous): a worker may refill it now
        self.deaths.pop(step, None)
        self.expect = step + 1
        self._fill()
        return StepResult(batch, digest, counts)

    def _reset(self, state: LoaderState) -> None:
        """Drop everything in flight (waiting for it: a slot being written is not free)
        and continue from ``state``."""
        while self.tasks:
            self._receive(next(iter(self.tasks.values())).worker, 1.0)
        self.free.extend(slot for slot, _, _ in self.done.values())
        self.done.clear()
        self.anchor = state
        for w in self.workers:
            _put(w.conn, ("reset", state))
        self.expect = self.next_submit = state.step

    # -- reporting and shutdown --------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Slot memory plus the workers' private (unshared) resident memory, as they last
        reported it (every few seconds)."""
        slots = sum(t.numel() * t.element_size() for s in self.slots for t in s.values())
        return slots + sum(self.memory)

    def close(self) -> None:
        for w in self.workers:
            try:
                _put(w.conn, None)
            except (OSError, ValueError):
                pass
        for w in self.workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self.workers = []


def _private_bytes(pid: int | None) -> int:
    """Private resident memory of ``pid`` (Linux ``smaps_rollup``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f
                       if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except (OSError, ValueError, IndexError):
        return 0
