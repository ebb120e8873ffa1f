"""The trainer's checkpointing: in memory every step (GEMINI), persistent every K steps.

``CheckpointManager`` is all the trainer calls (``train.py``)::

    ckpt = CheckpointManager(cfg, run_dir, dist_info)   # after the model and optimizer exist
    ckpt.restore(trainer)            # memory (own agent → replica) → persistent → from scratch
    with ckpt.sync_window():         # backward + gradient sync: checkpoint traffic waits
        loss.backward()
    row.update(ckpt.after_step(trainer))   # snapshot for the agent; DCP save every K steps
    summary.update(ckpt.finish(trainer))   # final persistent save; parameter digest

**In memory** (``checkpoint.memory_every``, default every step): active when the launcher
started checkpoint agents and exported ``ZENTRAIN_CKPT_AGENTS`` (``host:port`` of every
node's agent), ``ZENTRAIN_CKPT_JOB`` and ``ZENTRAIN_CKPT_NODE``; otherwise (plain torchrun,
benchmarks) it is off and costs nothing. Each rank's state is model + optimizer + step,
plus the loader and gradient-sync state where those have a ``state_dict``.

**Persistent** (``checkpoint.every`` K, and at the end): ``torch.distributed.checkpoint``
``async_save`` on a gloo group of its own (on the default group it deadlocks against the
training collectives, see notes/torch-cpu.md), into ``step_N.tmp``; when rank 0's future
completes every rank's data is written (DCP gathers the write results before rank 0 writes
the metadata), so rank 0 renames it to ``step_N`` and updates ``latest`` — the commit
protocol of ``zentrain.ckpt.persistent``, whose ``load`` reads these (also at another world
size). Each committed directory gets a ``zentrain.json`` naming the job, so a restarted
worker never mistakes an older run's checkpoint in the same directory for its own.

**Restore order** (GEMINI §3): the newest step committed on every rank from this node's
agent, else a peer's replica, else the persistent checkpoint (after a restart, or with
``--resume``), else step 0. Falling back past the agents resets them, so the abandoned,
newer timeline can never be restored later. No path unpickles arbitrary objects: agents'
checkpoints are JSON + raw bytes (``serialize``); DCP checkpoints load through
``persistent.load_state`` (allow-listed metadata, ``weights_only=True`` for every value).

Timestamps for recovery analysis go to ``RUN_DIR/recovery.jsonl`` (a row per rank and
start: where it restored from, when the process started, was built, had loaded) and each worker writes ``RUN_DIR/pids/rank{R}.json`` (pid, node, restart count),
which ``zentrain chaos`` uses to pick its victims.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from zentrain.chaos_analysis import CHAOS_RELEASE, ENV_CHAOS_HOLD
from zentrain.ckpt import persistent
from zentrain.ckpt.memory import MemoryCheckpointer
from zentrain.ckpt.memory_config import MemoryConfig
from zentrain.config import Config

if TYPE_CHECKING:
    from zentrain.train import Dist, Trainer

ENV_AGENTS = "ZENTRAIN_CKPT_AGENTS"
ENV_JOB = "ZENTRAIN_CKPT_JOB"
ENV_NODE = "ZENTRAIN_CKPT_NODE"

_T_IMPORTED = time.time()  # train.py imports this module last: ≈ "imports done"


def process_start_time() -> float:
    """Wall-clock time this process was created (from /proc, 10 ms resolution), so a
    restart's timeline starts at the exec, not when Python got around to reading a clock."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _T_IMPORTED


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CheckpointManager:
    """One per worker; see the module docstring for the calls and the order."""

    def __init__(self, cfg: Config, run_dir: Path, d: Dist,
                 env: dict[str, str] | os._Environ[str] = os.environ) -> None:
        self.cfg, self.ck, self.run_dir, self.d = cfg, cfg.checkpoint, Path(run_dir), d
        self.job = env.get(ENV_JOB) or env.get("TORCHELASTIC_RUN_ID") or "local"
        self.restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.node = int(env.get(ENV_NODE, "0") or 0)
        self.t_init = time.time()
        self.mem: MemoryCheckpointer | None = None
        agents = env.get(ENV_AGENTS, "")
        if self.ck.memory_every > 0 and agents:
            mc = MemoryConfig(job=self.job, agents=agents.split(","), node=self.node,
                              m=self.ck.replicas, send_bytes_per_s=self.ck.memory_bytes_per_s,
                              wait_commit=self.ck.wait_commit)
            self.mem = MemoryCheckpointer(mc, d.rank, d.world_size)
        # DCP async_save needs a group of its own (see the module docstring). new_group is
        # collective, so every rank creates it here, in the same order.
        self._pg = None
        if d.world_size > 1 and self.ck.async_persistent:
            self._pg = dist.new_group(backend="gloo")
        self._pending: tuple[Any, int] | None = None   # (future, step) of an async save
        self.saved_step: int | None = None              # newest persistent save started
        self.restored: dict[str, Any] = {}
        self._costs: list[tuple[float, float]] = []
        self._hooked = False
        self._cpu_mark: float | None = None
        self._done = 0  # steps done, as of the last restore() / after_step()
        hold = env.get(ENV_CHAOS_HOLD, "")
        self._hold_after = int(hold) if hold and d.rank == 0 else None
        self._write_pid()

    # -- restore -------------------------------------------------------------------------------
    def restore(self, tr: Trainer) -> int | None:
        """Load the newest usable checkpoint into the trainer; returns its step, or None when
        nothing newer than what the trainer holds was found. Collective: every rank calls it.

        Called after the trainer's own ``--resume`` load (``checkpoint.resume``), so after a
        restart of a resumed run a newer in-memory checkpoint still wins."""
        t0 = time.time()
        step, source = None, "none"
        # Workers of a replacement node start with restart count 0: agree on "restarted"
        # (every rank must take the same, collective, load path).
        restarted = self._max_over_ranks(self.restart) > 0
        if self.mem is not None:
            got = self.mem.load_latest()
            if got is not None:
                step, state = got
                self._load(tr, state)
                src = self.mem.last_load_source
                source = "memory" if src == self.node else f"memory-peer{src}"
        sync_state = None
        if step is None and self.ck.resume:
            source = "persistent"  # the trainer loaded model, optimizer and data already
            got_step = persistent.latest_step(self.run_dir)
            if got_step is not None and got_step == tr.step:
                sync_state = self._load_rank_state(tr, got_step)
        elif step is None and restarted:
            step = self._load_persistent(tr)
            if step is not None:
                source = "persistent"
                sync_state = self._load_rank_state(tr, step)
        if self.mem is not None and not source.startswith("memory") and restarted:
            # The agents may hold steps newer than what we resume from (all damaged, or
            # lost with a node): forget them so that timeline is never restored.
            if self.d.rank == 0:
                self.mem.reset_agents()
            if self.d.world_size > 1:
                dist.barrier()
        if step is not None:
            tr.step = step
        self._done = tr.step
        self.restored = {"rank": self.d.rank, "restart": self.restart, "step": tr.step,
                         "source": source,
                         "pid": os.getpid(), "t_proc_start": process_start_time(),
                         "t_imported": _T_IMPORTED, "t_init": self.t_init,
                         "t_restore_start": t0, "t_restored": time.time()}
        if sync_state is not None:
            self.restored["sync_state"] = sync_state
        self._append("recovery.jsonl", self.restored)  # one short line per rank
        return step

    def _max_over_ranks(self, value: int) -> int:
        if self.d.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _load(self, tr: Trainer, state: dict[str, Any]) -> None:
        tr.model.load_state_dict(state["model"])
        tr.optim.load_state_dict(state["optim"])
        tr.step = int(state["step"])
        if "data" in state and hasattr(tr.data, "load_state_dict"):
            tr.data.load_state_dict(state["data"])
        sync = getattr(tr.dp, "grad_sync", None)
        if "sync" in state and hasattr(sync, "load_state_dict"):
            # Agents hand back CPU tensors; the compressor keeps what it is given.
            sync.load_state_dict(persistent._to(state["sync"], self.d.device))

    def _load_rank_state(self, tr: Trainer, step: int) -> str:
        """The gradient sync's per-rank state (residuals, PowerSGD matrices, the
        compressor's step) from the persistent checkpoint of ``step``; returns what
        happened, for recovery.jsonl. At another world size it is dropped, with one line on
        rank 0 when that loses compressor state: model, optimizer and data reshard, this
        state cannot (each rank's residuals are its own unsent gradient)."""
        sync = getattr(tr.dp, "grad_sync", None)
        if not hasattr(sync, "load_state_dict"):
            return "none"
        compressed = hasattr(sync, "compressor")
        ckpt = persistent._dir(self.run_dir) / f"step_{step:06d}"
        why = None
        try:
            st = persistent.load_rank_state(ckpt, self.d.rank, self.d.world_size)
        except ValueError as e:
            st, why = None, str(e)
        if st is None:
            if compressed and self.d.rank == 0:
                print("[zentrain ckpt] compressor state not restored: "
                      f"{why or f'{ckpt} has none (written by an older zentrain)'}; "
                      f"{sync.compressor.name} starts afresh (zero residuals, warmup_steps "
                      "again)", file=sys.stderr, flush=True)
            return "dropped" if why else "absent"
        sync.load_state_dict(persistent._to(st, self.d.device))
        return "loaded"

    def _load_persistent(self, tr: Trainer) -> int | None:
        step = persistent.latest_step(self.run_dir)
        if step is None:
            return None
        if not self.ck.resume:  # a restart: only this job's own checkpoints
            marker = persistent._dir(self.run_dir) / f"step_{step:06d}" / persistent.MARKER_FILE
            try:
                if json.loads(marker.read_text()).get("job") != self.job:
                    return None
            except (OSError, ValueError):
                return None
        extra = self._extra(tr)
        try:
            got = persistent.load(self.run_dir, tr.model, tr.optim, extra)
        except (RuntimeError, KeyError, ValueError) as e:
            if "data" not in extra:
                raise
            # A checkpoint written without loader state (older, or another data config).
            print(f"[zentrain ckpt] persistent checkpoint has no loader state ({e}); loading "
                  "model and optimizer only", file=sys.stderr, flush=True)
            extra = {"step": torch.tensor(0)}
            got = persistent.load(self.run_dir, tr.model, tr.optim, extra)
        if got is None:
            return None
        if "data" in extra and hasattr(tr.data, "load_state_dict"):
            tr.data.load_state_dict(extra["data"])
        return int(extra["step"])

    # -- per step ------------------------------------------------------------------------------
    @contextmanager
    def sync_window(self) -> Iterator[None]:
        """Wrap backward + gradient sync: in-memory checkpoint traffic waits meanwhile."""
        self._maybe_hold()
        if self.mem is None or not self.ck.pause_in_sync:
            with nullcontext():
                yield
            return
        with self.mem.paused():
            yield

    def _maybe_hold(self) -> None:
        """``zentrain chaos`` (``ENV_CHAOS_HOLD``): once step K is done and written, hold the
        next step until the controller has killed its victim. Only rank 0 holds (the others
        wait for it in the gradient sync); after the release, or in a restarted process,
        nothing waits. Outside the sync window, so checkpoint transfers go on meanwhile."""
        if self._hold_after is None or self._done != self._hold_after:
            return
        self._hold_after = None
        release = self.run_dir / CHAOS_RELEASE
        deadline = time.monotonic() + 120
        while not release.exists():
            if time.monotonic() > deadline:
                print(f"[zentrain ckpt] {ENV_CHAOS_HOLD}: no release after 120 s; going on",
                      file=sys.stderr, flush=True)
                return
            time.sleep(0.002)

    def after_step(self, tr: Trainer) -> dict[str, Any]:
        """Call right after the optimizer step (``tr.step`` already counts it). Returns
        fields for the metrics row."""
        out: dict[str, Any] = {}
        self._done = tr.step
        if self.mem is not None and tr.step % self.ck.memory_every == 0:
            defer = self._can_defer(tr)
            st = self.mem.save_async(tr.step, self._state(tr), defer=defer)
            self._costs.append((st.blocked_s, st.snapshot_s))
            out.update(ckpt_blocked_s=st.blocked_s, ckpt_snapshot_s=st.snapshot_s)
            prev = self.mem.history[-1] if self.mem.history else None
            if prev is not None:  # the previous save, finished by now or earlier
                out.update(ckpt_barrier_s=prev.barrier_s, ckpt_copy_s=prev.copy_s,
                           ckpt_send_s=(prev.background_s - prev.paused_s - prev.copy_s
                                        - prev.commit_s),
                           ckpt_paused_s=prev.paused_s, ckpt_bytes=prev.nbytes,
                           ckpt_ok=prev.ok, ckpt_cpu_s=prev.cpu_s,
                           ckpt_copy_cpu_s=prev.copy_cpu_s, ckpt_commit_s=prev.commit_s)
                if prev.committed is not None:
                    out["ckpt_committed"] = prev.committed
        # CPU time of the training process since the last call, every thread but the
        # checkpoint's (intra-op and gloo threads train too): what the checkpoint's
        # background CPU time is compared with (load-independent, unlike wall time).
        cpu = self._train_cpu()
        if self._cpu_mark is not None:
            out["train_cpu_s"] = cpu - self._cpu_mark
        self._cpu_mark = cpu
        if self.ck.every and tr.step % self.ck.every == 0:
            out["persist_blocked_s"] = self.save_persistent(tr)
        self._poll()
        out["time"] = time.time()
        return out

    def _train_cpu(self) -> float:
        """Process CPU seconds so far minus the checkpoint thread's; the training thread's
        alone where the OS cannot give one thread's CPU time."""
        ck = self.mem.thread_cpu_s() if self.mem is not None else 0.0
        return time.process_time() - ck if ck is not None else time.thread_time()

    def _can_defer(self, tr: Trainer) -> bool:
        """Copy the snapshot in the background, during the next forward and backward? Only
        if nothing in the state changes before the next optimizer step: true when every
        model entry is a parameter (a BatchNorm's running stats change in forward). The
        optimizer waits for the copy through a pre-hook."""
        if not self._hooked:
            params = {p.data_ptr() for p in tr.model.parameters()}
            self._defer_ok = all(t.data_ptr() in params
                                 for t in tr.model.state_dict().values())
            mem = self.mem

            def before_update(*_: Any) -> None:
                if mem is not None:
                    mem.wait_snapshot()

            tr.optim.register_step_pre_hook(before_update)
            self._hooked = True
        return self._defer_ok

    def _state(self, tr: Trainer) -> dict[str, Any]:
        state: dict[str, Any] = {"model": tr.model.state_dict(), "optim": tr.optim.state_dict(),
                                 "step": tr.step}
        if hasattr(tr.data, "state_dict"):
            state["data"] = tr.data.state_dict()
        sync = getattr(tr.dp, "grad_sync", None)
        if hasattr(sync, "state_dict"):
            state["sync"] = sync.state_dict()
        return state

    def _extra(self, tr: Trainer) -> dict[str, Any]:
        extra: dict[str, Any] = {"step": torch.tensor(tr.step)}
        if hasattr(tr.data, "state_dict"):
            extra["data"] = tr.data.state_dict()
        return extra

    # -- persistent ----------------------------------------------------------------------------
    def save_persistent(self, tr: Trainer) -> float:
        """Start (async) or do (blocking) a persistent save of the current step; returns the
        seconds the training thread spent. Collective."""
        t0 = time.perf_counter()
        self._wait()  # at most one save in flight (the DCP advice)
        step, root = tr.step, persistent._dir(self.run_dir)
        tmp = root / f"step_{step:06d}.tmp"
        if self.d.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        if self.d.world_size > 1:
            dist.barrier(group=self._pg)
        sync = getattr(tr.dp, "grad_sync", None)
        if hasattr(sync, "state_dict"):
            # Per-rank, so not in DCP (which keeps one copy of a key). Written before the
            # DCP save starts: rank 0's commit, after every rank's DCP writes, covers it.
            persistent.save_rank_state(tmp, self.d.rank, self.d.world_size, sync.state_dict())
        state = persistent._app_state(tr.model, tr.optim, self._extra(tr))
        if self.ck.async_persistent:
            self._pending = (dcp.async_save(state, checkpoint_id=str(tmp),
                                            process_group=self._pg), step)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._commit(step)
        self.saved_step = step
        return time.perf_counter() - t0

    def _poll(self) -> None:
        if self._pending is not None and self._pending[0].done():
            self._wait()

    def wait_pending(self) -> None:
        """Finish the persistent save in flight, if any, and commit it (collective: every
        rank's part must be written). Raises if the save failed; nothing is committed then."""
        self._wait()

    def _wait(self) -> None:
        if self._pending is None:
            return
        fut, step = self._pending
        self._pending = None
        fut.result()  # raises if the save failed: nothing is committed then
        self._commit(step)

    def _commit(self, step: int, keep: int = 2) -> None:
        if self.d.rank != 0:
            return
        persistent.commit(self.run_dir, step, keep, marker=json.dumps(
            {"job": self.job, "step": step, "world_size": self.d.world_size}))

    # -- the end -------------------------------------------------------------------------------
    def finish(self, tr: Trainer) -> dict[str, Any]:
        """Final persistent save (``checkpoint.at_end``), wait for saves in flight, close;
        returns summary fields (parameter digest, checkpoint costs)."""
        if self.ck.at_end and self.saved_step != tr.step:
            self.save_persistent(tr)
        self._wait()
        out: dict[str, Any] = {"param_digest": state_digest(tr.model.state_dict())}
        if self.mem is not None:
            self.mem.wait(timeout=self.mem.cfg.timeout_s)
            hist = [st for st in self.mem.history if st.ok]
            n, m = max(1, len(self._costs)), max(1, len(hist))
            out["memory_ckpt"] = {
                "every": self.ck.memory_every, "saves": len(self._costs),
                "ok": len(hist), "bytes": hist[-1].nbytes if hist else 0,
                "blocked_s_mean": sum(c[0] for c in self._costs) / n,
                "snapshot_s_mean": sum(c[1] for c in self._costs) / n,
                "barrier_s_mean": sum(s.barrier_s for s in hist) / m,
                "copy_s_mean": sum(s.copy_s for s in hist) / m,
                "send_s_mean": sum(s.background_s - s.paused_s - s.copy_s for s in hist) / m}
        self.close()
        return out

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def _write_pid(self) -> None:
        d = self.run_dir / "pids"
        d.mkdir(parents=True, exist_ok=True)
        info = {"rank": self.d.rank, "pid": os.getpid(), "node": self.node, "job": self.job,
                "restart": self.restart, "t_proc_start": process_start_time()}
        tmp = d / f".rank{self.d.rank}.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        tmp.rename(d / f"rank{self.d.rank}.json")

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(row) + "\n")
