"""Run a function on N gloo ranks inside one pytest process, with teardown always.

Workers come from a ``forkserver`` whose server process has imported torch but never run
an op, so each rank starts in well under a second and never inherits a busy OpenMP pool
(forking a process that has run torch ops can hang its children). The parent hosts the
rendezvous ``TCPStore`` on port 0, so there is no free-port race. Any rank's exception is
re-raised in the parent with the rank's traceback; a rank that hangs is killed after
``timeout`` seconds and the test fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

_CTX: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        _CTX = ctx
    return _CTX


def _worker(fn, rank, world_size, port, args, kwargs, results, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle: the queue's pickler would send tensors as shared-memory handles,
        # which the parent can no longer open once this process has exited.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown must not mask the result
                pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable (a module-level function). Returns the per-rank return
    values in rank order; they must be picklable.
    """
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    ctx = _context()
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store.port, args, kwargs,
                                               results, threads), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    deadline = timeout
    try:
        while len(got) + len(errors) < world_size:
            try:
                r, ok, payload = results.get(timeout=deadline)
            except queue.Empty:
                alive = [i for i, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(
                    f"ranks {alive} still running after {timeout}s (hang?); "
                    f"finished: {sorted(got)}; errors: {errors}") from None
            if ok:
                got[r] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {r} ---\n{payload}")
                # One rank failed: give the others a short grace period, then stop.
                deadline = 15.0
    except TimeoutError:
        if errors:
            raise RuntimeError("\n".join(errors)) from None
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()  # release the queue's semaphores (else they linger in /dev/shm)
        results.join_thread()
        del store
    if errors:
        raise RuntimeError("\n".join(errors))
    return [got[r] for r in range(world_size)]
