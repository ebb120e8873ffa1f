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

from zentrain import launch
from zentrain.api import DataParallel
from zentrain.ckpt import persistent
from zentrain.ckpt.manager import CheckpointManager
from zentrain.compress import CompressConfig
from zentrain.compress.auto import resolve_auto
from zentrain.config import Config, ConfigError, load_config
from zentrain.data.corpus import DataError
from zentrain.metrics import (
    MetricsWriter,
    Progress,
    StepTimer,
    build_summary,
    peak_memory_bytes,
    print_summary,
    read_step_rows,
)
from zentrain.sync import comm


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
    if launch.resolve_device_type(cfg) == "cuda":
        # check_device_layout made sure there is a GPU per local rank under NCCL.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(cfg: Config) -> Dist:
    """Join the process group torchrun (or ``zentrain run``) set up; backend from device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Before any collective: a layout NCCL cannot run fails here on every rank alike.
    _, backend = launch.check_device_layout(cfg, local_world, world)
    launch.maybe_set_cublas_workspace(cfg)  # before the first cuBLAS call
    device = pick_device(cfg, local_rank)
    if local_rank == 0:
        launch.maybe_warn_oversubscribed(local_world, device.type)
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


def check_compression(cfg: Config) -> tuple[int, CompressConfig]:
    """Apply the compression policy to a meta-device model (no memory, no ranks): a
    pattern that matches nothing or a policy that picks nothing is a one-line
    ``ConfigError`` before any worker starts. Returns the number of entries compressed and
    the options with ``method="auto"`` resolved for this model."""
    from zentrain.compress import build_compressor, select_params
    from zentrain.models import build_model

    if cfg.compress.method == "none":
        return 0, cfg.compress
    with torch.device("meta"):
        model = build_model(cfg.model)
    try:
        comp = resolve_auto(cfg.compress, model)
        chosen = select_params(model, comp, build_compressor(comp).accepts_param)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sum(p.numel() for _, p in chosen), comp


def sync_label(cfg: Config) -> str:
    """The scheme and its compressors, e.g. ``zen+topk+powersgd``."""
    return "+".join(filter(None, [cfg.sync.scheme, cfg.compress.label]))


def _maybe_warn_ef_adamw(cfg: Config, rank: int, world: int) -> None:
    """Sparsifiers with error feedback stall under AdamW (measured; docs/compression.md,
    "Error feedback and AdamW"): say so once, with what works instead. Quiet once
    ``compress.method_for`` shows the user chose methods per parameter."""
    c = cfg.compress
    if rank == 0 and world > 1 and c.method in ("topk", "randomk", "sign") \
            and c.error_feedback and c.ef_on_all and not c.method_rules:
        print(f"[zentrain] warning: compress.method = {c.method!r} with error feedback under "
              "AdamW trained far worse than without it here (loss stalls near the unigram "
              "level; docs/compression.md#error-feedback-and-adamw); consider "
              "error feedback on the output layer only (compress.error_feedback_params="
              "'head.weight' in the GPT model), compress.error_feedback=false, or "
              "compress.method='powersgd'",
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


def maybe_densify_grads(model: nn.Module) -> None:
    """Sparse COO gradients (``model.sparse_embedding``, left sparse by ``ddp`` and by a
    single rank) become dense: fused AdamW and norm clipping take dense gradients only."""
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def _seed_step(cfg: Config, step: int, rank: int) -> None:
    # Re-seeding from (seed, step, rank) makes dropout resumable without saving RNG state.
    torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)


def _reduce_stats(values: list[float], d: Dist) -> tuple[list[float], list[float]]:
    """Mean and max over ranks of a few scalars (one small all-gather per step)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.world_size == 1:
        return values, values
    out = torch.empty(d.world_size * len(values), dtype=torch.float64, device=d.device)
    comm.all_gather_single(out, t)
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
        # "auto" becomes per-name methods here, so the log, the summary and the
        # compressor's state all name what runs (topk for head.weight, ...)
        cfg.compress = resolve_auto(cfg.compress, model)
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
            maybe_densify_grads(self.model)
            norm = (float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip))
                    if cfg.train.grad_clip > 0 else 0.0)
        # Every rank agrees on the step's fate before anything changes the parameters: the
        # loss is per rank, so the check runs on gathered values (identical everywhere).
        t0 = time.perf_counter()
        (mean_loss, _, _, _), (_, max_sent, max_recv, max_norm) = _reduce_stats(
            [loss_sum / accum, float(stats.bytes_sent), float(stats.bytes_recv), norm], self.d)
        stats_s = time.perf_counter() - t0
        if not (math.isfinite(mean_loss) and math.isfinite(max_norm)):
            self.optim.zero_grad(set_to_none=True)
            what = f"loss {mean_loss}" if not math.isfinite(mean_loss) else \
                f"gradient norm {max_norm} (loss {mean_loss:.4f})"
            raise NonFiniteLoss(f"non-finite {what} at step {self.step + 1}")
        with timer("optimizer"):
            self.optim.step()
            self.optim.zero_grad(set_to_none=True)
        times = timer.reset()
        return {"loss": mean_loss, "times": times, "sync": stats, "max_sent": max_sent,
                "max_recv": max_recv, "stats_s": stats_s}

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
                         f"{d.device.type}), sync={sync_label(cfg)}; {self.data.describe}")
        t_start = time.perf_counter()
        hist: list[dict[str, float]] = []
        eval_out: dict[str, float] = {}
        start_step = self.step
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                try:
                    out = self.train_step()
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(
                        f"{e}; stopped before the optimizer step. {self._keep_last_good()}; "
                        f"try a lower train.lr (now {cfg.train.lr:g}) or train.grad_clip "
                        f"(now {cfg.train.grad_clip:g})") from None
                # The stats exchange is outside the step time, as the reporting it serves.
                step_time = time.perf_counter() - t0 - out["stats_s"]
                s, mean_loss = out["sync"], out["loss"]
                max_sent, max_recv = out["max_sent"], out["max_recv"]
                self.step += 1
                items = self.data.items_per_batch * cfg.train.grad_accum * d.world_size
                row = {"step": self.step, "loss": mean_loss, "lr": lr_at(cfg, self.step - 1),
                       "step_time_s": step_time,
                       **{f"{k}_s": v for k, v in out["times"].items()},
                       "stats_s": out["stats_s"],
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
        summary = {**self._summary(hist, eval_out, start_step, time.perf_counter() - t_start),
                   **self.ckpt.finish(self)}  # final persistent save, digest
        summary["ranks_agree"] = self._ranks_agree(summary["param_digest"])
        return summary

    def _keep_last_good(self) -> str:
        """After a non-finite step: finish the persistent save in flight and commit it (it
        holds the state after the last step whose loss and gradients were finite; left
        uncommitted, it stayed ``step_N.tmp`` and ``--resume`` found nothing). Collective.
        Returns a sentence for the error message."""
        where = f"{self.run_dir}/checkpoints"
        note = ""
        try:
            self.ckpt.wait_pending()
        except Exception as e:  # noqa: BLE001 - the loss is the error to report
            note = f" (the save in flight failed: {type(e).__name__}: {e})"
        self.ckpt.close()
        step = persistent.latest_step(self.run_dir)
        if step is None:
            return f"No checkpoint was committed in {where} before it{note}"
        return f"--resume continues from step {step} (the newest checkpoint in {where}){note}"

    def _ranks_agree(self, digest: str) -> bool:
        """Every rank ends with bit-identical parameters (the sync's contract): checked once."""
        if self.d.world_size == 1:
            return True
        digests: list[Any] = [None] * self.d.world_size
        dist.all_gather_object(digests, digest)
        return len(set(digests)) == 1

    def _summary(self, hist, eval_out, start_step, wall) -> dict[str, Any]:
        # After a restart or --resume, the steps before it are in metrics.jsonl (rank 0's).
        rows = (read_step_rows(self.run_dir, start_step) if self.is_main and start_step
                else []) + hist
        return build_summary(
            rows, eval_out, wall, unit=self.data.unit, run_dir=str(self.run_dir),
            model=self.cfg.model.name, sync=sync_label(self.cfg),
            world_size=self.d.world_size, backend=self.d.backend, steps=self.step)


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
    # seed: ZEN's hash seeds follow train.seed, so a rerun sends the same bytes per server
    opts: dict[str, Any] = {"dense_threshold": cfg.sync.dense_threshold,
                            "seed": cfg.train.seed}
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


def _says_it(e: Exception, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """One message per job, not one per rank: every rank agrees on a non-finite loss (rank 0
    says it); a config error is the same on every rank of a node (local rank 0 says it); a
    data error can be one rank's own (each rank says its own)."""
    if isinstance(e, NonFiniteLoss):
        return int(env.get("RANK", 0) or 0) == 0
    if isinstance(e, ConfigError):
        return int(env.get("LOCAL_RANK", 0) or 0) == 0
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir: Path | None = None
    try:
        overrides = args.overrides + (["checkpoint.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.run_dir or os.environ.get("ZENTRAIN_RUN_DIR") or default_run_dir(cfg))
        code = launch.fatal_before(run_dir)
        if code is not None:
            if int(os.environ.get("RANK", 0) or 0) == 0:
                print(f"zentrain: not restarting: a worker of this job stopped with exit code "
                      f"{code} (its error is above), which a restart cannot fix",
                      file=sys.stderr, flush=True)
            return code
        run(cfg, run_dir)
    except (ConfigError, DataError, NonFiniteLoss) as e:
        code = 3 if isinstance(e, NonFiniteLoss) else 2
        if _says_it(e):
            print(f"zentrain: error: {e}", file=sys.stderr, flush=True)
        if run_dir is not None:
            launch.record_fatal(run_dir, code, str(e))
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
