"""The allowed range of every numeric config field, and the walk that checks them.

Kept apart from ``config.py`` (the dataclass tree and its loading) so the table reads as
one piece; ``config.validate`` raises ``ConfigError`` with ``range_error``'s message.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args, get_origin


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric config field (finite numbers only)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "a finite number"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_POS = Range(0, lo_open=True)      # > 0
_NONNEG = Range(0)                 # >= 0
_ONE_UP = Range(1)                 # >= 1
_FRACTION = Range(0, 1)            # [0, 1]
_PROB = Range(0, 1, hi_open=True)  # [0, 1)

RANGES: dict[str, Range] = {
    "model.n_layer": _ONE_UP, "model.n_head": _ONE_UP, "model.d_model": _ONE_UP,
    "model.seq_len": _ONE_UP, "model.vocab_size": Range(256, note=" (byte-level BPE)"),
    "model.dropout": _PROB, "model.num_fields": _ONE_UP, "model.num_dense": _ONE_UP,
    "model.rows_per_field": _ONE_UP, "model.embed_dim": _ONE_UP, "model.mlp_dims": _ONE_UP,
    "data.eval_fraction": _PROB, "data.max_bytes": _NONNEG, "data.synthetic_samples": _ONE_UP,
    "data.zipf_alpha": _NONNEG, "data.global_batch_size": _NONNEG,
    "data.num_workers": _NONNEG, "data.prefetch": _ONE_UP,
    "data.sources.weight": _NONNEG, "data.sources.weight_end": Range(),  # < 0: no ramp
    "data.sources.ramp_steps": _NONNEG, "data.sources.ramp_start": _NONNEG,
    "data.vocab_min_count": _ONE_UP,
    "train.steps": _ONE_UP, "train.batch_size": _ONE_UP, "train.grad_accum": _ONE_UP,
    "train.lr": _POS, "train.min_lr_ratio": _FRACTION, "train.warmup_steps": _NONNEG,
    "train.weight_decay": _NONNEG, "train.beta1": _PROB, "train.beta2": _PROB,
    "train.grad_clip": _NONNEG, "train.seed": Range(0, 2**32 - 1),
    "train.eval_every": _NONNEG, "train.eval_batches": _ONE_UP, "train.threads": _NONNEG,
    "sync.bucket_mb": _POS, "sync.dense_threshold": _FRACTION,
    "sync.auto_profile_steps": _ONE_UP, "sync.auto_recheck_every": _NONNEG,
    "parallel.nproc": _ONE_UP, "parallel.timeout_s": _POS,
    "checkpoint.every": _NONNEG, "checkpoint.memory_every": _NONNEG,
    "checkpoint.replicas": _ONE_UP, "checkpoint.max_restarts": _NONNEG,
    "checkpoint.memory_bytes_per_s": _NONNEG,
    "metrics.log_every": _ONE_UP,
    "compress.ratio": Range(0, 1, lo_open=True), "compress.rank": _ONE_UP,
    "compress.bits": Range(2, 8), "compress.warmup_steps": _NONNEG,
    "compress.min_numel": _ONE_UP, "compress.momentum": _PROB,
    "compress.bucket_size": _ONE_UP, "compress.seed": _NONNEG,
    "compress.global_topk_factor": _ONE_UP,
}
"""Allowed values of every numeric field, by dotted key (``data.sources.weight`` covers
each ``data.sources[i].weight``; a list field's range applies to each element). A test
checks that every int/float field of the config tree has an entry."""

_NON_EMPTY = {"model.mlp_dims"}
"""List fields that must hold at least one element."""


def _is_numeric(tp: Any) -> bool:
    return tp in (int, float) or (get_origin(tp) is list and get_args(tp)[0] in (int, float))


def numeric_fields(obj: Any, key: str = "", rkey: str = "") -> Iterator[tuple[str, str, Any]]:
    """Walk a config tree: (key as the user writes it, key in ``RANGES``, value) of every
    numeric field, lists of tables included."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        k, rk = f"{key}.{name}" if key else name, f"{rkey}.{name}" if rkey else name
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(value, k, rk)
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            for i, item in enumerate(value):
                yield from numeric_fields(item, f"{k}[{i}]", rk)
        elif _is_numeric(tp):
            yield k, rk, value


def range_error(cfg: Any) -> str | None:
    """The first numeric field of ``cfg`` outside its range, as a one-line message."""
    for key, rkey, value in numeric_fields(cfg):
        rng = RANGES.get(rkey)
        if rng is None:
            continue  # test_config guards that every numeric field has a range
        if isinstance(value, list):
            if (rkey in _NON_EMPTY and not value) or not all(_ok(v, rng) for v in value):
                return (f"{key} must be a {'non-empty ' * (rkey in _NON_EMPTY)}"
                        f"list of numbers {rng} (got {value!r})")
        elif not _ok(value, rng):
            return f"{key} must be {rng}{rng.note} (got {value!r})"
    return None


def _ok(v: Any, rng: Range) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and v in rng
