"""Take the next step's batch off the worker pool on a thread, while the trainer computes.

Taking a batch from the pool is cheap but not free: a pipe message in, a copy out of the
shared slot, a task message out. On the trainer's thread that is ~0.25 ms after a step
(each torch or pipe call is slow when the step has just evicted the caches), which is 1% of
DeepFM's 27 ms CPU step, and far more of a GPU step. ``Ahead`` does it for step ``s + 1``
on a thread of the training process while step ``s`` runs, so ``train_batch`` only hands
over what is ready (PyTorch's DataLoader moves its pinning to a thread for the same
reason). The thread waits in ``select`` and copies with torch, both without the GIL; its CPU
time is reported (``cpu_s``), so the cost is moved off the step's critical path, not hidden.

Order and exactness do not change: the thread asks the pool for exactly the step after the
one just served, so it never runs ahead of what the trainer will ask next, and a step asked
out of order is taken on the caller's thread from the planner's state (as without it).
Only one of the two threads uses the pool at a time. On CUDA the thread also starts the
step's host-to-device copy (``take``, see ``device.py``), so that too happens beside the
step. An error the thread meets (a worker
that keeps dying, a corrupt record with ``on_error = "fail"``) is raised by the
``train_batch`` of the step it was for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from zentrain.data.plan import LoaderState
from zentrain.data.workers import StepResult, WorkerPool

Take = Callable[[int, "LoaderState | None"], StepResult]
"""``take(step, reset_state)``: ``pool.get`` and whatever delivery adds (``device.py``)."""

POLL_MIN_S, POLL_MAX_S = 0.001, 0.02
"""Bounds of how often the idle thread looks for the next step to take: a twentieth of the
trainer's step period. ``get`` does not wake it: a woken thread takes the trainer's CPU and
then the GIL right after the handover (measured on DeepFM: mean wait 0.76 ms with a notify,
0.2 ms without). Nor does it poll faster than it must: every look takes the GIL, and 1000
looks a second slowed the GPT debug step by ~5% on 2 cores."""


class Ahead:
    """One step of read-ahead over ``pool`` (see the module docstring)."""

    def __init__(self, pool: WorkerPool, state_at: Callable[[int], LoaderState],
                 take: Take | None = None) -> None:
        self.pool, self.state_at = pool, state_at
        self.take: Take = take or pool.get
        self._cv = threading.Condition()
        self._want: int | None = None  # the step the thread is taking now
        self._got: tuple[int, StepResult | None, BaseException | None] | None = None
        self._closed = False
        self.cpu_s = 0.0
        self._poll_s = POLL_MIN_S
        self._last_get: float | None = None
        """CPU seconds the thread spent taking batches (the trainer process pays them)."""
        self._thread = threading.Thread(target=self._loop, name="zentrain-data-ahead",
                                        daemon=True)
        self._thread.start()

    def get(self, step: int) -> StepResult:
        """The batch of ``step``; then starts taking ``step + 1``."""
        now = time.perf_counter()
        if self._last_get is not None:
            self._poll_s = min(POLL_MAX_S, max(POLL_MIN_S, (now - self._last_get) / 20))
        self._last_get = now
        with self._cv:
            self._cv.wait_for(lambda: self._want is None)
            got, self._got = self._got, None
        if got is not None and got[0] == step:
            if got[2] is not None:
                raise got[2]
            res = got[1]
            assert res is not None
        else:  # first step, or out of order: the thread is idle, take it here
            pool = self.pool
            res = self.take(step, self.state_at(step) if step != pool.expect else None)
        with self._cv:
            self._want = step + 1
        return res

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._want is None and not self._closed:
                    self._cv.wait(self._poll_s)
                if self._closed:
                    return
                step = self._want
            assert step is not None
            c0 = time.thread_time()
            res: StepResult | None = None
            err: BaseException | None = None
            try:
                res = self.take(step, None)  # in order: the pool expects exactly this step
            except BaseException as e:  # noqa: BLE001 - raised by the trainer's get(step)
                err = e
            self.cpu_s += time.thread_time() - c0
            with self._cv:
                self._got, self._want = (step, res, err), None
                self._cv.notify_all()

    def close(self) -> None:
        """Stop the thread; a take in flight gives up within a second (``pool.closing``)."""
        with self._cv:
            self._closed = True
            self.pool.closing = True
            self._cv.notify_all()
        self._thread.join()
