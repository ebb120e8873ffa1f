"""The loader the trainer uses: global deterministic order, exact reshardable resume, workers.

    loader = build_loader(cfg, rank, world, is_builder)   # same collective rules as build_data
    loader.set_device(device)                             # CUDA: copies beside the step
    loader.warm_up()                                      # start the worker server now
    loader.load_state_dict(saved)                         # on resume (optional)
    for step in range(start, steps):
        for micro in range(grad_accum):
            batch = loader.train_batch(step, micro)       # this rank's micro-batch
        row["batch_digest"] = loader.batch_digest(step)
        row["mixture"] = loader.mixture(step)
    checkpoint_extra["data"] = loader.state_dict()        # tensors, identical on every rank
    loader.close()

What is fixed: the global batch of step ``s`` (``global_batch_size`` samples) is a function of
the seed and the loader state only (``plan.py``); rank ``r`` of ``w`` takes its contiguous
``1/w`` slice, split into ``train.grad_accum`` micro-batches. So the order is the same for
any number of ranks or workers, and a state saved at 4 ranks resumes at 2 with exactly the
next samples. Preparation runs in ``data.num_workers`` background processes
(``workers.py``) ``data.prefetch`` steps ahead; with 0 workers the same batches are built
in the training process.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zentrain.config import Config, ConfigError
from zentrain.data.ahead import Ahead
from zentrain.data.corpus import DataError, log
from zentrain.data.device import DeviceStager, hand_over
from zentrain.data.plan import LoaderState, MixSchedule, Planner, allocate, batch_digest
from zentrain.data.sources import Resolved, Source, batch_layout, build_batch, resolve_sources
from zentrain.data.workers import STALL_TIMEOUT_S, PlanSpec, StepResult, WorkerPool, _context

_EVAL_SEED = 20240917  # eval batches do not depend on train.seed: runs stay comparable


def build_loader(cfg: Config, rank: int, world: int, is_builder: bool) -> Loader:
    """The loader of ``cfg`` for ``rank`` of ``world``.

    Like ``build_data``: the builder (local rank 0) builds the caches (tokenizer, token
    files, Criteo index) while the others wait at a barrier, then open them; GPT sets
    ``cfg.model.vocab_size`` to the tokenizer's real size. Starts no process: workers start
    at the first ``train_batch``.
    """
    if cfg.model.name not in ("gpt", "deepfm"):
        raise DataError(f"no data for model.name {cfg.model.name!r}")
    resolved = resolve_sources(cfg, is_builder)
    if resolved.vocab_size is not None:
        cfg.model.vocab_size = resolved.vocab_size
    return Loader(cfg, resolved, rank, world)


class Loader:
    """One rank's view of the global sample stream (see the module docstring)."""

    def __init__(self, cfg: Config, resolved: Resolved, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.sources: list[Source] = resolved.sources
        self.kind = resolved.kind
        self.vocab_size = resolved.vocab_size
        self.unit = "tokens" if self.kind == "text" else "samples"
        self.names = [s.name for s in self.sources]
        self.layout = batch_layout(self.kind, cfg)
        self.accum = cfg.train.grad_accum
        self.num_workers, self.prefetch = cfg.data.num_workers, cfg.data.prefetch
        gbs = cfg.data.global_batch_size or cfg.train.batch_size * self.accum * world
        self.schedule = MixSchedule(tuple(s.config for s in self.sources))
        state = LoaderState(0, [0] * len(self.sources), gbs, [s.n_train for s in self.sources])
        self._check_split(gbs, "data.global_batch_size")
        self.planner = Planner(state.sizes, self.schedule, cfg.train.seed, state)
        self.next_step = 0
        self._pool: WorkerPool | None = None
        self._ahead: Ahead | None = None
        self._ahead_cpu_before = 0.0
        self._readers: list[Any] | None = None
        self._current: tuple[int, StepResult] | None = None
        self._seen: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()
        self._eval: list[dict[str, Tensor]] | None = None
        # Test hook: (step, n): the worker building ``step`` dies the first n times.
        self._crash_at: tuple[int, int] | None = None
        self._warned_daemon = False
        self._device: torch.device | None = None  # set_device: CUDA only
        self._stager: DeviceStager | None = None
        self.stall_timeout_s = STALL_TIMEOUT_S
        """A worker that builds nothing for this long is an error (a hang, not a slow disk)."""
        self.restarts_before = 0

    # -- sizes -------------------------------------------------------------------------------
    def _check_split(self, gbs: int, what: str) -> None:
        if gbs % (self.world * self.accum):
            raise ConfigError(
                f"{what} = {gbs} samples cannot be split evenly over {self.world} ranks x "
                f"{self.accum} micro-batches (train.grad_accum); use a world size and "
                f"grad_accum whose product divides {gbs}")
        # Any size is well defined (sources wrap into new epochs), but a step that repeats
        # samples within itself is almost always a mistake (too many ranks for a toy corpus).
        total = sum(s.n_train for s in self.sources)
        if gbs > total:
            unit = "windows" if self.kind == "text" else "samples"
            raise DataError(
                f"--nproc {self.world} larger than the data allows: a global batch of {gbs} "
                f"samples ({what}; by default train.batch_size x grad_accum x ranks) but only "
                f"{total:,} training {unit} in all sources, so every step would repeat "
                "samples; use fewer ranks, a smaller batch, a shorter model.seq_len or more "
                "data")

    @property
    def global_batch_size(self) -> int:
        return self.planner.global_batch_size

    @property
    def micro_batch_size(self) -> int:
        """Samples in one of this rank's micro-batches."""
        return self.global_batch_size // self.world // self.accum

    @property
    def items_per_batch(self) -> int:
        """Units (tokens or samples) in one of this rank's micro-batches."""
        per = self.cfg.model.seq_len if self.kind == "text" else 1
        return self.micro_batch_size * per

    @property
    def describe(self) -> str:
        srcs = "; ".join(f"{s.name} [{s.fmt}, weight {_weight_text(s)}]: {s.what}, "
                         f"{s.n_train:,} train / {s.n_eval:,} eval samples"
                         for s in self.sources)
        return (f"{srcs}; global batch {self.global_batch_size} samples "
                f"({self.micro_batch_size} x {self.accum} per rank), "
                f"{self.num_workers} loader workers")

    def warm_up(self) -> None:
        """Start the worker server in the background now (optional): it imports torch and the
        main module once, which otherwise delays the first ``train_batch`` by seconds. Call
        it right after ``build_loader`` in the training process to overlap that with model
        construction (not in a launcher that only validates data)."""
        if self.num_workers > 0 and not mp.current_process().daemon:
            from multiprocessing import forkserver

            _context()
            try:
                # The instance's method, not the module alias bound at import: a child of
                # zentrain.zygote replaces it to adopt the zygote's running server.
                forkserver._forkserver.ensure_running()  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - an optimisation; the pool starts anyway
                log.warning(f"loader warm-up skipped ({e}); the workers start at the first "
                            "batch")

    def set_device(self, device: torch.device | str) -> None:
        """Deliver training batches on ``device``. CUDA: each batch goes from its slot into
        a pinned buffer and to the GPU on a side stream, on the read-ahead thread while the
        previous step trains; ``train_batch`` makes the current stream wait for the copy
        (``device.py``). CPU: nothing changes. Call before training (it restarts the
        workers)."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"the loader cannot deliver batches on {device}: CUDA is not "
                              "available (allowed here: 'cpu')")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        want = device if device.type == "cuda" else None
        if want != self._device:
            self.close()
            self._device = want

    # -- training batches --------------------------------------------------------------------
    def train_batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """Micro-batch ``micro`` of this rank's share of step ``step``.

        Steps are meant to come in order (each one's micro-batches in any order); asking for
        an earlier step than the last re-plans from there, which is slower but exact.
        """
        if not 0 <= micro < self.accum:
            raise ValueError(f"micro-batch {micro} out of range (train.grad_accum = "
                             f"{self.accum})")
        if self._current is None or self._current[0] != step:
            res = self._fetch(step)
            if res.ready is not None:  # CUDA: the copy runs on the side stream
                assert self._device is not None
                hand_over(res.batch, res.ready, self._device)
            self._current = (step, res)
            self.next_step = step + 1
        batch = self._current[1].batch
        if self.accum == 1:
            return batch
        mb = self.micro_batch_size
        return {k: v[micro * mb:(micro + 1) * mb] for k, v in batch.items()}

    def _fetch(self, step: int) -> StepResult:
        if self._device is not None and self._stager is None:
            self._stager = DeviceStager(self._device, self.layout,
                                        self.global_batch_size // self.world)
        if self.num_workers == 0 or self._daemonic():
            res = self._build_here(step)
            if self._stager is not None:
                res.batch, res.ready = self._stager.stage(res.batch)
        else:
            if self._pool is None:
                self._pool = WorkerPool([s.recipe for s in self.sources], self._spec(),
                                        self.planner.state_at(step), self.layout,
                                        self.num_workers, self.prefetch,
                                        self._crash_at, self.stall_timeout_s)
                self._ahead = Ahead(self._pool, self.planner.state_at, self._take)
            assert self._ahead is not None
            res = self._ahead.get(step)
        self._seen[step] = (res.digest, res.counts)
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        return res

    def _take(self, step: int, reset: LoaderState | None) -> StepResult:
        """A step from the pool (on the read-ahead thread, or the caller's); on CUDA copied
        into a pinned buffer and sent to the device."""
        assert self._pool is not None
        if self._stager is None:
            return self._pool.get(step, reset)
        i, host = self._stager.host_buffer()
        res = self._pool.get(step, reset, out=host)
        res.batch, res.ready = self._stager.send(i, host)
        return res

    def _daemonic(self) -> bool:
        """A daemonic process (e.g. inside a multiprocessing pool) may not start children:
        build in this process instead (same batches), and say so once."""
        if not mp.current_process().daemon:
            return False
        if not self._warned_daemon:
            log.warning(f"data.num_workers = {self.num_workers} ignored: this process "
                        "is daemonic and cannot start workers; building batches in it")
            self._warned_daemon = True
        return True

    def _spec(self) -> PlanSpec:
        return PlanSpec(tuple(self.planner.sizes), self.schedule, self.cfg.train.seed,
                        self.rank, self.world)

    def _open_readers(self) -> list[Any]:
        if self._readers is None:
            self._readers = [s.recipe.open() for s in self.sources]
        return self._readers

    def _build_here(self, step: int) -> StepResult:
        ids = self.planner.global_ids(step)
        out = self._empty(self.global_batch_size // self.world)
        build_batch(self._open_readers(), self.planner.rank_ids(step, self.rank, self.world),
                    out)
        counts = np.bincount(ids[:, 0], minlength=len(self.sources)).tolist()
        return StepResult({k: torch.from_numpy(v) for k, v in out.items()},
                          batch_digest(ids), counts)

    def _empty(self, rows: int) -> dict[str, np.ndarray]:
        return {k: np.empty((rows, *shape), dtype) for k, (shape, dtype) in self.layout.items()}

    # -- what the metrics log ----------------------------------------------------------------
    def _step_info(self, step: int) -> tuple[str, list[int]]:
        hit = self._seen.get(step)
        if hit is None:
            ids = self.planner.global_ids(step)
            hit = (batch_digest(ids), np.bincount(ids[:, 0], minlength=len(self.sources))
                   .tolist())
        return hit

    def batch_digest(self, step: int) -> str:
        """Hash of step ``step``'s global batch sample ids, in order (the same on every rank,
        for any world size or worker count): compare runs from ``metrics.jsonl`` alone."""
        return self._step_info(step)[0]

    def mixture(self, step: int) -> dict[str, int]:
        """Samples per source in step ``step``'s global batch (the realised mixture)."""
        return dict(zip(self.names, self._step_info(step)[1]))

    def sample_ids(self, step: int) -> np.ndarray:
        """``[global_batch_size, 2]`` (source, index) of step ``step``, in batch order."""
        return self.planner.global_ids(step)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The global loader state after the last step served (tensors, so it goes into a
        ``torch.distributed.checkpoint`` as is; identical on every rank)."""
        st = self.planner.state_at(self.next_step)
        return {"step": torch.tensor(st.step, dtype=torch.int64),
                "consumed": torch.tensor(st.consumed, dtype=torch.int64),
                "sizes": torch.tensor(st.sizes, dtype=torch.int64),
                "global_batch_size": torch.tensor(st.global_batch_size, dtype=torch.int64)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from a saved state (of any world size). The saved global batch size is
        kept unless ``data.global_batch_size`` is set explicitly."""
        consumed = [int(x) for x in torch.as_tensor(sd["consumed"]).tolist()]
        if len(consumed) != len(self.sources):
            raise DataError(f"the checkpoint's data state has {len(consumed)} sources, the "
                            f"config {len(self.sources)} ({', '.join(self.names)})")
        sizes = [int(x) for x in torch.as_tensor(sd["sizes"]).tolist()]
        for s, old in zip(self.sources, sizes):
            if old != s.n_train:
                log.warning(f"data source {s.name!r} had {old:,} train samples at the "
                            f"checkpoint and has {s.n_train:,} now: the order after resume "
                            "is not the one the original run would have seen")
        gbs = int(sd["global_batch_size"])
        explicit = self.cfg.data.global_batch_size
        if explicit and explicit != gbs:
            log.warning(f"data.global_batch_size = {explicit} replaces the checkpoint's {gbs}")
            gbs = explicit
        self._check_split(gbs, "the checkpoint's global batch size")
        state = LoaderState(int(sd["step"]), consumed, gbs, [s.n_train for s in self.sources])
        self.close()  # slots are sized for the old batch: start workers afresh
        self.planner.reset(state)
        self.next_step = state.step
        self._current = None
        self._seen.clear()
        if self.micro_batch_size != self.cfg.train.batch_size:
            log.warning(f"resuming with a global batch of {gbs} samples: {self.micro_batch_size} "
                        f"per micro-batch on each of {self.world} ranks (train.batch_size = "
                        f"{self.cfg.train.batch_size} applies to new runs only)")

    # -- eval --------------------------------------------------------------------------------
    def eval_batches(self) -> list[dict[str, Tensor]]:
        """``train.eval_batches`` fixed batches of ``train.batch_size`` from the sources'
        held-out samples, in proportion to their step-0 weights; identical on every rank and
        in every run (empty when nothing is held out)."""
        if self._eval is None:
            self._eval = self._make_eval()
        return self._eval

    def _make_eval(self) -> list[dict[str, Tensor]]:
        tc = self.cfg.train
        held = [i for i, s in enumerate(self.sources) if s.n_eval > 0]
        if not held or tc.eval_batches == 0:
            return []
        total = tc.eval_batches * tc.batch_size
        w = self.schedule(0)[held]
        counts = allocate(total, w if w.sum() > 0 else np.ones(len(held)), 0.5)
        ids = []
        for i, k in zip(held, counts):
            s = self.sources[i]
            # Spread over the whole held-out range; wrap around when it is shorter.
            j = (np.arange(k) * s.n_eval) // k if k <= s.n_eval else np.arange(k) % s.n_eval
            ids.append(np.stack([np.full(k, i), s.n_train + j], 1))
        all_ids = np.concatenate(ids)
        order = np.random.default_rng(_EVAL_SEED).permutation(len(all_ids))
        out = self._empty(total)
        build_batch(self._open_readers(), all_ids[order], out)
        return [{k: torch.from_numpy(v[b * tc.batch_size:(b + 1) * tc.batch_size].copy())
                 for k, v in out.items()} for b in range(tc.eval_batches)]

    # -- resources ---------------------------------------------------------------------------
    @property
    def restarts(self) -> int:
        """Worker processes restarted so far."""
        return self.restarts_before + (self._pool.restarts if self._pool else 0)

    @property
    def background_cpu_s(self) -> float:
        """CPU seconds this process spent taking batches on its read-ahead thread (the
        training thread's own time in ``train_batch`` is on top)."""
        return self._ahead_cpu_before + (self._ahead.cpu_s if self._ahead else 0.0)

    def worker_pids(self) -> list[int]:
        return self._pool.pids() if self._pool else []

    def memory_bytes(self) -> int:
        """What the loader holds on this rank: prefetch slots + the workers' private memory
        (0 workers: the last batch) + pinned staging buffers (CUDA). Memory-mapped data is
        page cache, not counted."""
        pinned = self._stager.ring.nbytes if self._stager is not None else 0
        if self._pool is not None:
            return self._pool.memory_bytes() + pinned
        cur = self._current[1].batch if self._current else {}
        return pinned + sum(t.numel() * t.element_size() for t in cur.values())

    def close(self) -> None:
        """Stop the workers (idempotent; a later ``train_batch`` starts new ones)."""
        if self._ahead is not None:  # first: it may be using the pool
            self._ahead.close()
            self._ahead_cpu_before += self._ahead.cpu_s
            self._ahead = None
        if self._pool is not None:
            self.restarts_before += self._pool.restarts
            self._pool.close()
            self._pool = None
        # Sized for this batch; the allocator keeps pinned memory until its copies complete.
        self._stager = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _weight_text(s: Source) -> str:
    c = s.config
    if c.weight_end >= 0 and c.ramp_steps:
        start = f" from step {c.ramp_start}" if c.ramp_start else ""
        return f"{c.weight:g}->{c.weight_end:g} over {c.ramp_steps} steps{start}"
    return f"{c.weight:g}"
