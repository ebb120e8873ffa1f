"""Persistent checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``RUN_DIR/checkpoints/step_000123/`` (a DCP directory) and ``latest``, a text
file naming the newest *committed* step. A save writes into ``step_N.tmp``, and only after
every rank has finished does rank 0 rename it and update ``latest`` (atomic rename), so a
crash mid-save never leaves a checkpoint that ``--resume`` would load; the previous one
stays. DCP loads into the live state dicts in place (no pickle of arbitrary objects), and a
checkpoint saved at one world size loads at another since the model is replicated.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_step(run_dir: Path) -> int | None:
    f = _dir(run_dir) / "latest"
    if not f.is_file():
        return None
    step = int(f.read_text().strip())
    return step if (_dir(run_dir) / f"step_{step:06d}").is_dir() else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _app_state(model: nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]
               ) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "extra": extra}


def save(run_dir: Path, step: int, model: nn.Module, optim: torch.optim.Optimizer,
         extra: dict[str, Any], keep: int = 2) -> Path:
    """Save (collectively) and commit; keeps the newest ``keep`` checkpoints."""
    root = _dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_app_state(model, optim, extra), checkpoint_id=str(tmp))
    _barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(str(step))
        (root / "latest.tmp").rename(root / "latest")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load(run_dir: Path, model: nn.Module, optim: torch.optim.Optimizer,
         extra: dict[str, Any]) -> int | None:
    """Load the newest committed checkpoint in place; returns its step, or None if none.

    ``extra`` must hold entries of the same structure as saved (tensors / ints); they are
    filled in place.
    """
    step = latest_step(run_dir)
    if step is None:
        return None
    state = _app_state(model, optim, extra)
    dcp.load(state, checkpoint_id=str(_dir(run_dir) / f"step_{step:06d}"))
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra.update(state["extra"])
    return step
