"""Per-step timers, the metrics.jsonl writer, progress display and the summary table."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


class StepTimer:
    """Accumulates wall time per phase for one step (``with timer("forward"): ...``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        # CUDA kernels run asynchronously: without a sync at both ends, a phase would be
        # charged with the GPU work queued before it and miss its own.
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def reset(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1) if enabled else None  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress:
    """A live bar on a terminal; a plain line every ~5% when output is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.interactive = enabled and sys.stdout.isatty() and not os.environ.get("CI")
        self._every = max(1, total // 20)
        self._bar = None
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self._every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {info}", flush=True)

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def read_step_rows(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    """Step rows (those with a ``loss``) of ``RUN_DIR/metrics.jsonl`` up to step ``upto``,
    in step order; a step logged twice (re-run after a restart) counts once, its last row."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and "loss" in row and row.get("step", upto + 1) <= upto:
                by_step[int(row["step"])] = row
    return [by_step[k] for k in sorted(by_step)]


def build_summary(rows: list[dict[str, Any]], eval_out: dict[str, float], wall: float, *,
                  unit: str, **info: Any) -> dict[str, Any]:
    """``summary.json`` from the run's step rows (all attempts: see ``read_step_rows``):
    means over the steady state, i.e. without the run's first two steps (warm-up)."""
    steady = rows[min(len(rows) - 1, 2):] if rows else []

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in steady) / max(1, len(steady))

    return {
        **info, "unit": unit,
        "final_train_loss": rows[-1]["loss"] if rows else float("nan"), "eval": eval_out,
        "throughput": mean(f"{unit}_per_s"), "step_time_s": mean("step_time_s"),
        "breakdown": {k: mean(k) for k in ("data_wait_s", "forward_s", "backward_s",
                                           "sync_s", "optimizer_s")},
        "sync_bytes_sent_per_step": mean("sync_bytes_sent"),
        "sync_bytes_sent_max_per_step": mean("sync_bytes_sent_max"),
        "peak_mem_bytes": max((r.get("peak_mem_bytes", 0) for r in rows), default=0),
        "steps_measured": len(steady),
        "wall_time_s": wall,
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return str(n)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: what was trained and where each step's time went."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"zentrain run: {summary['run_dir']}", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    unit = summary["unit"]
    rows = [
        ("model / sync", f"{summary['model']} / {summary['sync']} on {summary['world_size']} "
                         f"rank(s), {summary['backend']}"),
        ("steps", f"{summary['steps']}"),
        ("final train loss", f"{summary['final_train_loss']:.4f}"),
    ]
    for k, v in summary.get("eval", {}).items():
        rows.append((f"final {k}", f"{v:.4f}"))
    rows += [
        (f"{unit}/s (all ranks)", f"{summary['throughput']:,.0f}"),
        ("step time (mean)", f"{summary['step_time_s'] * 1000:.1f} ms"),
    ]
    for phase in ("data_wait_s", "forward_s", "backward_s", "sync_s", "optimizer_s"):
        v = summary["breakdown"].get(phase, 0.0)
        share = 100 * v / summary["step_time_s"] if summary["step_time_s"] else 0.0
        rows.append((f"  {phase[:-2]}", f"{v * 1000:.1f} ms ({share:.0f}%)"))
    rows += [
        ("sync bytes sent / rank / step", fmt_bytes(summary["sync_bytes_sent_per_step"])),
        ("peak memory (rank 0)", fmt_bytes(summary["peak_mem_bytes"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
