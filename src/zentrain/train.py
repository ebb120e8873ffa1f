"""The trainer: one process per data-parallel rank, started by ``zentrain run`` or torchrun.

    torchrun --nproc-per-node 2 -m zentrain.train configs/debug.toml --set train.steps=50

One step, top to bottom (see ``train_step``): batch (``data_wait``) → forward → backward,
during which post-accumulate-grad hooks hand gradients to the ``GradSync`` and the sync
completes as backward returns → clip + AdamW step → one metrics row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zentrain.api import DataParallel
from zentrain.ckpt import persistent
from zentrain.ckpt.manager import CheckpointManager
from zentrain.config import Config, ConfigError, load_config
from zentrain.data.corpus import DataError
from zentrain.metrics import MetricsWriter, Progress, StepTimer, peak_memory_bytes, print_summary


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available (allowed here: "
                              "'cpu' or 'auto')")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(cfg: Config) -> Dist:
    """Join the process group torchrun (or ``zentrain run``) set up; backend from device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = pick_device(cfg, local_rank)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend = 'nccl' needs CUDA tensors (allowed on CPU: 'gloo')")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(
            seconds=cfg.parallel.timeout_s), device_id=device if device.type == "cuda" else None)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    return Dist(rank, world, local_rank, local_world, device, backend if world > 1 else "none")


def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` (a pure function of step)."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _maybe_warn_ef_adamw(cfg: Config, rank: int, world: int) -> None:
    """Sparsifiers with error feedback stall under AdamW (measured; docs/compression.md,
    "Error feedback and AdamW"): say so once, with what works instead."""
    c = cfg.compress
    if rank == 0 and world > 1 and c.method in ("topk", "randomk", "sign") \
            and c.error_feedback:
        print(f"[zentrain] warning: compress.method = {c.method!r} with error feedback under "
              "AdamW trained far worse than without it here (loss stalls near the unigram "
              "level; docs/compression.md#error-feedback-and-adamw); consider "
              "compress.error_feedback=false or compress.method='powersgd'",
              file=sys.stderr, flush=True)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices that are not embedding tables (nanoGPT's rule)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in emb]
    keep = [p for p in model.parameters() if p.requires_grad and (p.dim() < 2 or id(p) in emb)]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (CPU and CUDA); several times faster than the
    # per-parameter loop on large embedding tables, and deterministic.
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             fused=True)


def _seed_step(cfg: Config, step: int, rank: int) -> None:
    # Re-seeding from (seed, step, rank) makes dropout resumable without saving RNG state.
    torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)


def _reduce_stats(values: list[float], d: Dist) -> tuple[list[float], list[float]]:
    """Mean and max over ranks of a few scalars (one small all-gather per step)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size == 1:
        return values, values
    out = torch.empty(d.world_size * len(values), dtype=torch.float64, device=d.device)
    dist.all_gather_single(out, t)
    m = out.view(d.world_size, len(values))
    return m.mean(0).tolist(), m.max(0).values.tolist()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, d: Dist) -> None:
        from zentrain.data import build_loader
        from zentrain.models import build_model

        self.cfg, self.run_dir, self.d = cfg, run_dir, d
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.data = _build_data_collectively(build_loader, cfg, d)
        self.data.set_device(d.device)  # CUDA: batches reach the GPU beside the step
        self.data.warm_up()  # the workers' server starts while the model is built
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(d.device)
        self.model = model
        self.dp = DataParallel(model, sync=cfg.sync.scheme, bucket_mb=cfg.sync.bucket_mb,
                               compress=cfg.compress, **_sync_opts(cfg))
        self.optim = build_optimizer(cfg, model)
        _maybe_warn_ef_adamw(cfg, d.rank, d.world_size)
        self.step = 0
        self.timer = StepTimer(d.device)
        self.is_main = d.rank == 0
        self.ckpt = CheckpointManager(cfg, run_dir, d)  # in-memory + persistent checkpoints

    # -- the step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, timer = self.cfg, self.timer
        _seed_step(cfg, self.step, self.d.rank)
        for g in self.optim.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        accum = cfg.train.grad_accum
        loss_sum = 0.0
        sync_s = 0.0
        for micro in range(accum):
            with timer("data_wait"):
                batch = {k: v.to(self.d.device, non_blocking=True)
                         for k, v in self.data.train_batch(self.step, micro).items()}
            with timer("forward"), torch.autocast(self.d.device.type, dtype=torch.bfloat16,
                                                  enabled=cfg.train.bf16):
                _, loss = self.dp(**batch)
            last = micro == accum - 1
            with timer("backward"), (self.dp.no_sync() if not last else _null()), \
                    self.ckpt.sync_window():  # checkpoint traffic waits for the sync
                (loss / accum).backward()
            loss_sum += loss.item()
        stats = self.dp.finish_sync() if self.d.world_size == 1 else self.dp.last_stats
        sync_s = stats.exposed_s
        timer.times["backward"] -= sync_s  # the sync callback ran inside backward
        timer.times["sync"] = sync_s
        with timer("optimizer"):
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optim.step()
            self.optim.zero_grad(set_to_none=True)
        times = timer.reset()
        return {"loss": loss_sum / accum, "times": times, "sync": stats}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from zentrain.evaluation import evaluate

        cfg, d = self.cfg, self.d
        if cfg.checkpoint.resume:
            extra = {"step": torch.tensor(0), "data": self.data.state_dict()}
            got = persistent.load(self.run_dir, self.model, self.optim, extra)
            if got is None:
                raise ConfigError(f"checkpoint.resume = true but {self.run_dir}/checkpoints "
                                  "holds no committed checkpoint")
            self.step = int(extra["step"])
            # The loader state is global: it resumes at any world size with the next samples.
            self.data.load_state_dict(extra["data"])
        self.ckpt.restore(self)  # after a restart: in memory, else a replica, else on disk
        metrics = MetricsWriter(self.run_dir, self.is_main)
        progress = Progress(cfg.train.steps, self.step, self.is_main and cfg.metrics.progress)
        if self.is_main:
            progress.log(f"[zentrain] {cfg.model.name} on {d.world_size} rank(s) ({d.backend}, "
                         f"{d.device.type}), sync={cfg.sync.scheme}; {self.data.describe}")
        t_start = time.perf_counter()
        hist: list[dict[str, float]] = []
        eval_out: dict[str, float] = {}
        last_loss = float("nan")
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                out = self.train_step()
                step_time = time.perf_counter() - t0
                s = out["sync"]
                (mean_loss, _, _), (_, max_sent, max_recv) = _reduce_stats(
                    [out["loss"], float(s.bytes_sent), float(s.bytes_recv)], d)
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(
                        f"non-finite loss {mean_loss} at step {self.step}; stopping. The last "
                        f"good checkpoint (if any) in {self.run_dir}/checkpoints is kept; try a "
                        f"lower train.lr (now {cfg.train.lr}) or train.grad_clip")
                self.step += 1
                last_loss = mean_loss
                items = self.data.items_per_batch * cfg.train.grad_accum * d.world_size
                row = {"step": self.step, "loss": mean_loss, "lr": lr_at(cfg, self.step - 1),
                       "step_time_s": step_time,
                       **{f"{k}_s": v for k, v in out["times"].items()},
                       f"{self.data.unit}_per_s": items / step_time,
                       "sync_bytes_sent": s.bytes_sent, "sync_bytes_recv": s.bytes_recv,
                       "sync_bytes_sent_max": int(max_sent), "sync_bytes_recv_max": int(max_recv),
                       "peak_mem_bytes": peak_memory_bytes(d.device),
                       "batch_digest": self.data.batch_digest(self.step - 1),
                       "mixture": self.data.mixture(self.step - 1),
                       "data_mem_bytes": self.data.memory_bytes()}
                row.update(self.ckpt.after_step(self))  # snapshot; persistent every K
                if s.extra:  # scheme figures: path taken, density, imbalance per table
                    row["sync_stats"] = {k: v for k, v in s.extra.items()
                                         if isinstance(v, int | float | str | bool)}
                hist.append(row)
                if self.step % cfg.metrics.log_every == 0 or self.step == cfg.train.steps:
                    metrics.write(row)
                progress.update(self.step, f"loss {mean_loss:.3f}  "
                                f"{row[f'{self.data.unit}_per_s']:,.0f} {self.data.unit}/s")
                evaluate_now = (cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                if evaluate_now or self.step == cfg.train.steps:
                    eval_out = evaluate(self.model, self.data.eval_batches(), cfg.model.name)
                    metrics.write({"step": self.step, **{f"eval/{k}": v
                                                         for k, v in eval_out.items()}})
                    progress.log("  eval step {}: {}".format(self.step, ", ".join(
                        f"{k} {v:.4f}" for k, v in eval_out.items())))
        finally:
            self.data.close()  # stop the loader's workers
            progress.close()
            metrics.close()
        return {**self._summary(hist, eval_out, last_loss, time.perf_counter() - t_start),
                **self.ckpt.finish(self)}  # final persistent save, digest

    def save(self) -> None:
        persistent.save(self.run_dir, self.step, self.model, self.optim,
                        {"step": torch.tensor(self.step), "data": self.data.state_dict()})

    def _summary(self, hist, eval_out, last_loss, wall) -> dict[str, Any]:
        steady = hist[min(len(hist) - 1, 2):] if hist else []  # skip warm-up steps
        def mean(key: str) -> float:
            return sum(r.get(key, 0.0) for r in steady) / max(1, len(steady))
        step_time = mean("step_time_s")
        return {
            "run_dir": str(self.run_dir), "model": self.cfg.model.name,
            "sync": self.cfg.sync.scheme, "world_size": self.d.world_size,
            "backend": self.d.backend, "steps": self.step, "unit": self.data.unit,
            "final_train_loss": last_loss, "eval": eval_out,
            "throughput": mean(f"{self.data.unit}_per_s"), "step_time_s": step_time,
            "breakdown": {k: mean(k) for k in ("data_wait_s", "forward_s", "backward_s",
                                               "sync_s", "optimizer_s")},
            "sync_bytes_sent_per_step": mean("sync_bytes_sent"),
            "sync_bytes_sent_max_per_step": mean("sync_bytes_sent_max"),
            "peak_mem_bytes": max((r["peak_mem_bytes"] for r in hist), default=0),
            "wall_time_s": wall,
        }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _sync_opts(cfg: Config) -> dict[str, Any]:
    if cfg.sync.scheme == "ddp":
        return {}
    if cfg.sync.scheme == "dense":
        return {}
    opts: dict[str, Any] = {"dense_threshold": cfg.sync.dense_threshold}
    if cfg.sync.scheme == "auto":
        opts.update(profile_steps=cfg.sync.auto_profile_steps,
                    recheck_every=cfg.sync.auto_recheck_every)
    return opts


def _build_data_collectively(build_data, cfg: Config, d: Dist):
    """Local rank 0 builds caches (tokenizer, memmaps) while the others wait, then all open."""
    if d.world_size == 1:
        return build_data(cfg, d.rank, d.world_size, is_builder=True)
    if d.local_rank == 0:
        bundle = build_data(cfg, d.rank, d.world_size, is_builder=True)
        dist.barrier()
        return bundle
    dist.barrier()
    return build_data(cfg, d.rank, d.world_size, is_builder=False)


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train on this process's rank; returns the summary (rank 0 writes it to disk)."""
    d = init_distributed(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if d.rank == 0:
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        trainer = Trainer(cfg, run_dir, d)
        summary = trainer.fit()
        if d.rank == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print_summary(summary)
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zentrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML config (default: configs/debug.toml values)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--run-dir", default=None, help="where metrics, config and checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    return p.parse_args(argv)


def default_run_dir(cfg: Config) -> Path:
    # Under torchrun every rank must pick the same directory: use the job's run id.
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    stamp = rid if rid != "none" else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.sync.scheme}-{stamp}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = args.overrides + (["checkpoint.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.run_dir or os.environ.get("ZENTRAIN_RUN_DIR") or default_run_dir(cfg))
        run(cfg, run_dir)
    except (ConfigError, DataError, NonFiniteLoss) as e:
        print(f"zentrain: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLoss) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
