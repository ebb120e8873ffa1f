"""Persistent checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``RUN_DIR/checkpoints/step_000123/`` (a DCP directory) and ``latest``, a text
file naming the newest *committed* step. A save writes into ``step_N.tmp``, and only after
every rank has finished does rank 0 rename it and update ``latest`` (atomic rename), so a
crash mid-save never leaves a checkpoint that ``--resume`` would load; the previous one
stays. DCP loads into the live state dicts in place (no pickle of arbitrary objects), and a
checkpoint saved at one world size loads at another since the model is replicated.

Loading never unpickles arbitrary objects: DCP stores tensors raw and other values with
``torch.save`` (read back with ``weights_only=True``), but its ``.metadata`` file is a plain
pickle, which ``FileSystemReader`` loads with ``pickle.load``. ``SafeReader`` reads it with
an unpickler that resolves only DCP's own metadata classes, ``torch.Size``, dtypes and
layouts, so a crafted checkpoint cannot run code (``test_recovery.py`` checks this).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_MD, n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                               "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                               "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath")}  # StorageMeta.checkpoint_id when saved with a Path


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     "checkpoint never needs; refusing to load it")


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled against an allow-list."""

    refused: pickle.UnpicklingError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None and self.refused is not None:
            # DCP falls back to per-rank metadata when the global file fails to load;
            # don't let that hide why it failed.
            raise self.refused
        try:
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            self.refused = e
            raise
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("checkpoint metadata is not a DCP Metadata object")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


MARKER_FILE = "zentrain.json"
"""Written into a checkpoint directory by the trainer: job, step and world size."""


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
        commit(run_dir, step, keep)
    _barrier()
    return final


def commit(run_dir: Path, step: int, keep: int = 2, marker: str | None = None) -> None:
    """Make the written ``step_N.tmp`` the newest checkpoint (rank 0 only): rename it, point
    ``latest`` at it (both renames are atomic) and delete all but the newest ``keep``.
    ``marker`` is written into the checkpoint as ``MARKER_FILE`` first."""
    root = _dir(run_dir)
    tmp, final = root / f"step_{step:06d}.tmp", root / f"step_{step:06d}"
    if marker is not None:
        (tmp / MARKER_FILE).write_text(marker)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(str(step))
    (root / "latest.tmp").rename(root / "latest")
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


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
    reader = SafeReader(_dir(run_dir) / f"step_{step:06d}")
    try:
        dcp.load(state, storage_reader=reader)
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        if reader.refused is not None:  # DCP wraps the refusal in a CheckpointException
            raise reader.refused from e
        raise
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra.update(state["extra"])
    return step
