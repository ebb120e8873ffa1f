"""Persistent checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout: ``RUN_DIR/checkpoints/step_000123/`` (a DCP directory) and ``latest``, a text
file naming the newest *committed* step. A save writes into ``step_N.tmp``, and only after
every rank has finished does rank 0 rename it and update ``latest`` (atomic rename), so a
crash mid-save never leaves a checkpoint that ``--resume`` would load; the previous one
stays. DCP loads into the live state dicts in place (no pickle of arbitrary objects), and a
checkpoint saved at one world size loads at another since the model is replicated.

Loading never unpickles arbitrary objects. DCP stores tensors raw (read back with
``torch.load(weights_only=True)``) and every other value (optimizer ``param_groups``, the
step, ...) as a ``torch.save`` blob that its ``DefaultLoadPlanner.load_bytes`` reads with
``weights_only=False``, and its ``.metadata`` file is a plain pickle, which
``FileSystemReader`` loads with ``pickle.load``. Both are closed here: ``SafeLoadPlanner``
reads the blobs with ``weights_only=True`` (containers, numbers, strings and tensors only),
and ``SafeReader`` unpickles the metadata against an allow-list of DCP's own metadata
classes, ``torch.Size``, dtypes and layouts, and refuses to run with any other planner. A
crafted checkpoint is refused with ``UnsafeCheckpoint`` before anything in it runs
(``tests/ckpt/test_recovery.py`` plants payloads in both places).

Per-rank state (the gradient sync's residuals, PowerSGD matrices, step counters) is not
replicated, but DCP keeps one copy of every key, so it goes into a side file per rank,
``rank{R}.pt``, written into ``step_N.tmp`` before the DCP save starts (so it is there
whenever the directory is committed) and read with ``weights_only=True``. It is only
valid at the world size it was written at: ``load_rank_state`` refuses it otherwise.
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
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_MD, n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                               "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                               "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath")}  # StorageMeta.checkpoint_id when saved with a Path


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint holds something that would run code (or build arbitrary objects) if
    loaded; nothing of it was executed."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint metadata refers to {module}.{name}, which a "
                               "checkpoint never needs; refusing to load it")


def safe_torch_load(data: Any, what: str) -> Any:
    """``torch.load(weights_only=True)``; a refusal becomes ``UnsafeCheckpoint`` naming
    ``what`` and the offending global (torch's advice to retry with ``weights_only=False``
    is dropped: that retry is exactly what must not happen)."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        reason = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x),
                      lines[-1] if lines else "unpickling refused")
        raise UnsafeCheckpoint(f"{what} is not plain data: {reason[:200]}; refusing to "
                               "load it") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values are read with ``weights_only=True``.

    DCP hands every non-tensor entry (``BYTE_IO`` items: ``param_groups`` floats, tuples
    and bools, step counters) to ``load_bytes``, which upstream reads with
    ``torch.load(weights_only=False)``: a crafted data file could run code there even when
    the metadata is clean."""

    refused: UnsafeCheckpoint | None = None

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = safe_torch_load(value, f"checkpoint entry {fqn!r}")
        except UnsafeCheckpoint as e:
            self.refused = e  # DCP wraps what read_data raises; keep the reason
            raise
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled against an allow-list, and which
    only reads data for a ``SafeLoadPlanner``."""

    refused: pickle.UnpicklingError | None = None

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        # Tensors are read with weights_only=True by FileSystemReader itself; the other
        # values go through planner.load_bytes, which must be the safe one.
        if not isinstance(planner, SafeLoadPlanner):
            raise TypeError(f"SafeReader needs a SafeLoadPlanner, got {type(planner).__name__}"
                            " (whose load_bytes may unpickle arbitrary objects)")
        return super().read_data(plan, planner)

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
            raise UnsafeCheckpoint("checkpoint metadata is not a DCP Metadata object")
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
    text = f.read_text().strip()
    try:  # "4" as commit writes it; "step_000004" (a directory name) is accepted too
        step = int(text.removeprefix("step_"))
    except ValueError:
        raise ValueError(f"{f} holds {text!r}, not a step number: write the step to "
                         f"resume from (one of the step_N directories beside it)") from None
    return step if (_dir(run_dir) / f"step_{step:06d}").is_dir() else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _app_state(model: nn.Module, optim: torch.optim.Optimizer, extra: dict[str, Any]
               ) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "extra": extra}


def _rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank{rank}.pt"


def save_rank_state(ckpt: Path, rank: int, world_size: int, state: dict[str, Any]) -> None:
    """Write this rank's ``state`` (plain containers, numbers, strings, tensors) next to
    the DCP files of the checkpoint directory ``ckpt`` (normally ``step_N.tmp``, before the
    DCP save starts, so the commit that follows DCP's covers it). Tensors go to the CPU:
    the file must load on a machine without the device."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".rank{rank}.pt.tmp"
    torch.save({"rank": rank, "world_size": world_size, "state": _to(state, "cpu")}, tmp)
    tmp.rename(_rank_file(ckpt, rank))  # present means complete


def load_rank_state(ckpt: Path, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's state from ``save_rank_state`` (``weights_only=True``), or None when the
    checkpoint has none (written without it). Raises ``ValueError`` (one line) when it was
    written at another world size: per-rank state cannot be redistributed."""
    ckpt = Path(ckpt)
    files = sorted(ckpt.glob("rank*.pt"))
    if not files:
        return None
    f = _rank_file(ckpt, rank)
    blob = safe_torch_load(f if f.is_file() else files[0], f"per-rank state in {ckpt}")
    if not isinstance(blob, dict) or not isinstance(blob.get("state"), dict):
        raise UnsafeCheckpoint(f"{f} is not a zentrain per-rank state file")
    saved = blob.get("world_size")
    if saved != world_size or not f.is_file():
        raise ValueError(f"per-rank state in {ckpt} was saved by {saved} ranks, this run has "
                         f"{world_size}: it belongs to one rank and cannot be redistributed")
    return blob["state"]


def _to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor moved to ``device`` (containers rebuilt, tuples kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    return obj


def save(run_dir: Path, step: int, model: nn.Module, optim: torch.optim.Optimizer,
         extra: dict[str, Any], keep: int = 2, rank_state: dict[str, Any] | None = None
         ) -> Path:
    """Save (collectively) and commit; keeps the newest ``keep`` checkpoints.
    ``rank_state``: this rank's own state, see ``save_rank_state``."""
    root = _dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    if rank_state is not None:
        save_rank_state(tmp, dist.get_rank() if dist.is_initialized() else 0,
                        dist.get_world_size() if dist.is_initialized() else 1, rank_state)
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


def load_state(state: dict[str, Any], path: Path,
               process_group: dist.ProcessGroup | None = None) -> None:
    """``dcp.load`` of ``state`` (in place) from the DCP directory ``path``, with the safe
    reader and planner. A refusal is raised as ``UnsafeCheckpoint`` on every rank that met
    it (DCP raises a ``CheckpointException`` on the others, collectively, so none hangs)."""
    reader, planner = SafeReader(path), SafeLoadPlanner()
    try:
        dcp.load(state, storage_reader=reader, planner=planner, process_group=process_group)
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        refused = reader.refused or planner.refused
        if refused is not None:  # DCP wraps the refusal in a CheckpointException
            raise refused from e
        raise


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
    load_state(state, _dir(run_dir) / f"step_{step:06d}")
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra.update(state["extra"])
    return step
