"""Worker side of in-memory checkpointing: snapshot in the step, ship in the background.

``save_async(step, state)`` does the one thing that must happen before training changes
the tensors again — copy them into a buffer — and hands the bytes to a background thread
(CheckFreq's snapshot/persist split; GEMINI §5 for chunking). For CPU state the buffer is
a file in the local agent's tmpfs directory, mapped shared (usually a shard the agent
dropped, pages already allocated): the background thread computes the per-chunk CRCs and
tells the agent to adopt the file, so the snapshot copy is the only copy of the bytes on
this node. CUDA state is copied on a side stream into a pinned staging buffer (the
training stream waits for those copies on the GPU, the training thread not at all), and
the background thread copies it into such a file. With no local agent directory, it
streams the chunks to the agent over TCP, under ``send_bytes_per_s``. Either way the background thread waits between chunks while
the training thread is inside ``paused()`` (wrap the gradient-sync window in it), which
also holds the agent's replica relays. At most one save is in flight: a second
``save_async`` first waits for the previous one, and that wait is reported as
``blocked_s``.

``load_latest()`` returns the newest step committed on every rank, trying this node's
agent, then the replica holders (GEMINI placement), then any other agent; every copy is
checked against its CRCs and decoded without pickle. ``None`` means "use the persistent
checkpoint".
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from zentrain.ckpt import serialize
from zentrain.ckpt.agent import WINDOW_BYTES, WINDOW_FILE
from zentrain.ckpt.fillmaps import FillMaps
from zentrain.ckpt.memory_config import MemoryConfig, SaveStats
from zentrain.ckpt.memory_load import MemoryLoader
from zentrain.ckpt.placement import Placement
from zentrain.ckpt.wire import (
    ProtocolError,
    Throttle,
    connect,
    recv_msg,
    request,
    send_msg,
)

COMMIT_WAIT_S = 5.0      # longest wait for a step's commit before the next save
COMMIT_WAIT_SKIP = 20    # saves that do not wait after a wait timed out


def event_device(flat: serialize.Flat) -> torch.device:
    """The CUDA device of a snapshot's tensors (one per rank)."""
    return next(t.device for t in flat.tensors if t.is_cuda)


class MemoryCheckpointer(MemoryLoader):
    """One per worker process. See the module docstring for where to call what."""

    def __init__(self, cfg: MemoryConfig, rank: int, world: int) -> None:
        if not 0 <= rank < world or not 0 <= cfg.node < len(cfg.agents):
            raise ValueError(f"memory checkpointer: need 0 <= rank < world and 0 <= node < "
                             f"{len(cfg.agents)} agents; got rank={rank}, world={world}, "
                             f"node={cfg.node}")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.placement = Placement(len(cfg.agents), cfg.m)
        self.history: collections.deque[SaveStats] = collections.deque(maxlen=1000)
        self.last_load_source: int | None = None
        self._buf: torch.Tensor | None = None
        self._sig: tuple[Any, ...] | None = None
        self._cv = threading.Condition()
        self._job: tuple[serialize.Flat, Any, SaveStats, bool] | None = None
        self._copied = threading.Event()  # the deferred snapshot copy is done
        self._copied.set()
        self._current: SaveStats | None = None
        self._busy = False
        self._closed = False
        self._failing = False
        self._clear = threading.Event()
        self._clear.set()
        self._dir: Path | None = None      # the local agent's directory (zero-copy path)
        self._window: mmap.mmap | None = None
        self._fill: tuple[str, mmap.mmap] | None = None
        self._nfill = 0
        self._maps = FillMaps()
        self._skip_commit_wait = 0
        self._stream: Any = None     # CUDA side stream of the device-to-host copies
        self._gpu_copy: Any = None   # (event, device) until the training stream waits on it
        # Route CPU state through the staging buffer as CUDA state always goes (pinned
        # buffer, then the agent's file in the background); lets the CPU tests cover that
        # host-side path.
        self._stage_cpu = False
        if cfg.local:
            self._open_local()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"memckpt-{rank}")
        self._thread.start()

    def _open_local(self) -> None:
        try:
            reply = request(self.cfg.agents[self.cfg.node], {"op": "ping", "job": self.cfg.job},
                            min(self.cfg.timeout_s, 5.0))
            d = Path(reply["dir"])
            with open(d / WINDOW_FILE, "r+b") as f:
                self._window = mmap.mmap(f.fileno(), WINDOW_BYTES)
            self._window[self.rank % WINDOW_BYTES] = 0  # a killed predecessor's flag
        except (OSError, ProtocolError, KeyError):
            return  # agent down or not on this host: stream over TCP
        for old in d.glob(f"fill-r{self.rank}-*"):  # a killed predecessor's half-written file
            old.unlink(missing_ok=True)
        self._dir = d

    # -- saving ------------------------------------------------------------------------------
    def save_async(self, step: int, state: Any, defer: bool = False) -> SaveStats:
        """Snapshot ``state`` for ``step`` and send it in the background.

        Call it after the optimizer step, before the next forward: the transfer then
        overlaps forward/backward. Returns the (still filling) stats of this save.

        With ``defer`` even the copy happens in the background, while the next forward
        and backward run (CheckFreq: a snapshot only has to be complete before the next
        update): in the background thread for CPU state, on a side stream for CUDA state.
        The caller promises not to modify any tensor in ``state`` before
        ``wait_snapshot()`` returns — call it before the optimizer step (the trainer's
        checkpoint manager does so from an optimizer pre-hook).
        """
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        flat = serialize.flatten(state)
        cuda = any(t.is_cuda for t in flat.tensors)
        staged = cuda or self._stage_cpu
        event = None
        if staged:
            # Into a private (pinned, for CUDA) buffer; the background thread moves it into
            # the agent's file. CUDA copies run on a side stream: the training thread only
            # queues them, and the training stream waits for them on the GPU, not here.
            self._take_buffer(flat, staged=True)
            if cuda:
                event = self._copy_on_side_stream(flat)
                if defer:  # nothing changes before the next update: wait there
                    self._gpu_copy = (event, event_device(flat))
                else:      # forward may change buffers (BatchNorm): wait before it
                    torch.cuda.current_stream(event_device(flat)).wait_event(event)
            else:
                serialize.pack_into(flat, self._buf)
            defer = False
        elif not defer:  # deferred: the background thread maps its buffer (MAP_POPULATE)
            self._take_buffer(flat, staged=False)
            serialize.pack_into(flat, self._buf)
        st = SaveStats(step, flat.nbytes, blocked_s=t1 - t0,
                       snapshot_s=time.perf_counter() - t1)
        if not defer:
            flat = serialize.Flat(flat.tree, [], flat.specs, flat.nbytes)  # no live tensors
        else:
            self._copied.clear()
        self._current = st
        with self._cv:
            self._job, self._busy = (flat, event, st, defer, staged), True
            self._cv.notify_all()
        return st

    def _copy_on_side_stream(self, flat: serialize.Flat) -> Any:
        """Queue the device-to-host copies of ``flat`` into the pinned ``self._buf`` on a
        side CUDA stream, after everything already queued on the training stream (the
        update that produced the state); returns the event marking their end. Untested
        here (no GPU in CI): written for one CUDA device per rank."""
        dev = event_device(flat)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
        self._stream.wait_event(ready)
        with torch.cuda.stream(self._stream):
            serialize.pack_into(flat, self._buf, non_blocking=True)
            for t in flat.tensors:
                if t.is_cuda:  # the allocator must not reuse them before the copy ran
                    t.record_stream(self._stream)
            done = torch.cuda.Event()
            done.record(self._stream)
        return done

    def wait_snapshot(self) -> float:
        """Block until a deferred snapshot copy is done (the state may change after);
        returns the seconds waited. For CUDA state the training stream is made to wait for
        the side stream's copies instead: the GPU orders them, the CPU does not block."""
        if self._gpu_copy is not None:
            (event, device), self._gpu_copy = self._gpu_copy, None
            torch.cuda.current_stream(device).wait_event(event)
        if self._copied.is_set():
            return 0.0
        t0 = time.perf_counter()
        self._copied.wait()
        waited = time.perf_counter() - t0
        if self._current is not None:
            self._current.barrier_s += waited
        return waited

    def wait(self, timeout: float | None = None) -> SaveStats | None:
        """Wait for the save in flight; returns the stats of the newest finished save."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._busy, timeout):
                raise TimeoutError(f"in-memory checkpoint of rank {self.rank} still sending "
                                   f"after {timeout}s")
            return self.history[-1] if self.history else None

    def suggested_interval(self, step_time_s: float, recent: int = 5) -> int:
        """Steps between saves so a transfer fits in one interval (GEMINI §5: when the idle
        time cannot hold a checkpoint, checkpoint less often). Every rank must use the same
        value (all-reduce MAX), or the ranks save different steps and none ever commits."""
        done = [st.background_s - st.paused_s for st in list(self.history)[-recent:] if st.ok]
        if not done or step_time_s <= 0:
            return 1
        return max(1, math.ceil(sorted(done)[len(done) // 2] / step_time_s))

    def thread_cpu_s(self) -> float | None:
        """CPU seconds the background thread has used so far (None where the OS cannot
        tell one thread's CPU time from another's)."""
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        except (AttributeError, OSError, TypeError):
            return None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold checkpoint traffic while the block runs (e.g. backward + gradient sync):
        this worker's stream, and the local agent's replica relays (a byte in a shared
        file tells the agent)."""
        self._clear.clear()
        w, i = self._window, self.rank % WINDOW_BYTES
        if w is not None:
            w[i] = 1
        try:
            yield
        finally:
            if w is not None:
                w[i] = 0
            self._clear.set()

    def _take_buffer(self, flat: serialize.Flat, staged: bool) -> None:
        """Point ``self._buf`` at where this snapshot goes: a file the local agent adopts
        (no second copy), else (``staged``, or no local agent) a buffer kept while the
        state's layout stays the same, pinned for CUDA state. A DMA into the agent's
        shared file would need it page-locked (``cudaHostRegister`` on tmpfs pages), which
        is not portable; the staging buffer costs one host copy in the background."""
        fill = self._claim_fill(flat.nbytes) if self._dir is not None and not staged else None
        self._fill = fill
        if fill is not None:
            self._buf = None
            self._buf = torch.frombuffer(fill[1], dtype=torch.uint8) if flat.nbytes else \
                serialize.new_buffer(0)
            self._sig = None
        elif flat.signature != self._sig or self._buf is None:
            self._buf = None  # free the old buffer first
            pin = any(t.is_cuda for t in flat.tensors)
            self._buf = serialize.new_buffer(flat.nbytes, pin=pin)
            self._sig = flat.signature

    def _claim_fill(self, nbytes: int) -> tuple[str, mmap.mmap] | None:
        """A file in the agent's directory to snapshot into: a shard the agent dropped
        (its pages are already allocated), else a new one. Mapped shared."""
        assert self._dir is not None
        self._nfill += 1
        name = f"fill-r{self.rank}-{os.getpid()}-{self._nfill}"
        path = self._dir / name
        try:
            for free in sorted(self._dir.glob(f"free-r{self.rank}-*")):
                try:
                    os.rename(free, path)  # atomic: the agent never touches it again
                    break
                except FileNotFoundError:
                    continue
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                mm = self._maps.get(fd, nbytes)
            finally:
                os.close(fd)
        except OSError as e:  # agent gone (directory removed), tmpfs full: use TCP
            path.unlink(missing_ok=True)
            print(f"[zentrain ckpt rank {self.rank}] local handoff unavailable ({e}); "
                  "streaming to the agent instead", file=sys.stderr, flush=True)
            self._dir = None
            return None
        return name, mm

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._job is not None or self._closed)
                if self._job is None:
                    return
                (flat, event, st, defer, staged), self._job = self._job, None
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                if defer:
                    try:
                        self._take_buffer(flat, staged=False)
                        assert self._buf is not None
                        serialize.pack_into(flat, self._buf)
                        st.copy_s = time.perf_counter() - t0
                        st.copy_cpu_s = time.thread_time() - c0
                    finally:
                        flat = serialize.Flat(flat.tree, [], flat.specs, flat.nbytes)
                        self._copied.set()
                if event is not None:
                    event.synchronize()
                if staged and self._dir is not None:
                    self._fill = self._fill_from_staging(flat, st)
                if self._fill is not None:
                    st.handoff = "adopt"
                    self._adopt(flat, st, *self._fill)
                else:
                    st.handoff = "stream"
                    self._send(flat, st)
                st.ok = True
                self._wait_commit(st)
            except Exception as e:  # noqa: BLE001 - reported; training must go on
                st.error = f"{type(e).__name__}: {e}"
            st.background_s = time.perf_counter() - t0
            st.cpu_s = time.thread_time() - c0
            self._report(st)
            with self._cv:
                self.history.append(st)
                self._busy = False
                self._cv.notify_all()

    def _fill_from_staging(self, flat: serialize.Flat, st: SaveStats
                           ) -> tuple[str, mmap.mmap] | None:
        """Background thread: copy the staged snapshot into a file the local agent will
        adopt (None: no file could be made; stream it instead)."""
        fill = self._claim_fill(flat.nbytes)
        if fill is None or not flat.nbytes:
            return fill
        t0, c0 = time.perf_counter(), time.thread_time()
        assert self._buf is not None
        torch.frombuffer(fill[1], dtype=torch.uint8)[:flat.nbytes].copy_(self._buf)
        st.copy_s += time.perf_counter() - t0
        st.copy_cpu_s += time.thread_time() - c0
        return fill

    def _wait_commit(self, st: SaveStats) -> None:
        """Hold this save open until its step is committed (``MemoryConfig.wait_commit``).
        A dead or slow peer never fails the save; after a wait that timed out, the next
        ``COMMIT_WAIT_SKIP`` saves do not wait (a broken peer must not slow every step)."""
        if not self.cfg.wait_commit or not self.placement.replicas_of(self.cfg.node):
            return
        if self._skip_commit_wait > 0:
            self._skip_commit_wait -= 1
            return
        t0 = time.perf_counter()
        timeout = min(self.cfg.timeout_s / 2, COMMIT_WAIT_S)
        try:
            reply = request(self.cfg.agents[self.cfg.node],
                            {"op": "await_commit", "job": self.cfg.job, "rank": self.rank,
                             "step": st.step, "timeout": timeout}, self.cfg.timeout_s)
            st.committed = bool(reply.get("committed"))
        except (OSError, ProtocolError):
            st.committed = False
        st.commit_s = time.perf_counter() - t0
        if not st.committed and st.commit_s >= timeout * 0.9:
            self._skip_commit_wait = COMMIT_WAIT_SKIP
            print(f"[zentrain ckpt rank {self.rank}] step {st.step} not committed after "
                  f"{st.commit_s:.1f} s; the next {COMMIT_WAIT_SKIP} saves will not wait "
                  "for their commit", file=sys.stderr, flush=True)

    def _send(self, flat: serialize.Flat, st: SaveStats) -> None:
        assert self._buf is not None
        cfg, chunk = self.cfg, self.cfg.chunk_bytes
        data = memoryview(self._buf.numpy()) if flat.nbytes else memoryview(b"")
        header = serialize.make_header(flat, serialize.chunk_crcs(data, chunk), chunk)
        throttle = Throttle(cfg.send_bytes_per_s)
        with connect(cfg.agents[cfg.node], cfg.timeout_s) as s:
            send_msg(s, {"op": "put", "job": cfg.job, "rank": self.rank, "step": st.step,
                         "header": header})
            for off in range(0, flat.nbytes, chunk):
                if not self._clear.is_set():
                    tp = time.perf_counter()
                    self._clear.wait(cfg.timeout_s)
                    st.paused_s += time.perf_counter() - tp
                s.sendall(data[off:off + chunk])
                throttle.rate = cfg.send_bytes_per_s
                throttle(min(chunk, flat.nbytes - off))
            reply = recv_msg(s)
        if not reply.get("ok"):
            raise ProtocolError(reply.get("error", "agent refused the checkpoint"))

    def _adopt(self, flat: serialize.Flat, st: SaveStats, name: str, mm: mmap.mmap) -> None:
        """Zero-copy path: CRCs over the filled file, then the agent takes it over."""
        cfg, chunk = self.cfg, self.cfg.chunk_bytes
        try:
            data = memoryview(mm)[:flat.nbytes]
            crcs = []
            for off in range(0, flat.nbytes, chunk):  # chunk by chunk, pausing like _send
                if not self._clear.is_set():
                    tp = time.perf_counter()
                    self._clear.wait(cfg.timeout_s)
                    st.paused_s += time.perf_counter() - tp
                crcs.append(serialize.checksum(data[off:off + chunk]))
            data.release()
            header = serialize.make_header(flat, crcs, chunk)
            request(cfg.agents[cfg.node], {"op": "adopt", "job": cfg.job, "rank": self.rank,
                                           "step": st.step, "header": header, "file": name},
                    cfg.timeout_s)
        except BaseException:
            assert self._dir is not None
            (self._dir / name).unlink(missing_ok=True)
            raise

    def _report(self, st: SaveStats) -> None:
        # One line when saving starts failing and one when it works again, not one per step.
        if st.ok == self._failing:
            self._failing = not st.ok
            what = (f"failing from step {st.step}: {st.error}" if not st.ok
                    else f"working again at step {st.step}")
            print(f"[zentrain ckpt rank {self.rank}] in-memory checkpoint {what}",
                  file=sys.stderr, flush=True)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._busy, self.cfg.timeout_s * 2)
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self._buf = None
        self._fill = None
        self._maps.close()

    def __enter__(self) -> MemoryCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
