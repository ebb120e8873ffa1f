"""Data for the built-in models.

The trainer uses ``build_loader`` (``loader.py``): several sources mixed by weight, one
global sample order for any world size, exact resume, background workers. Below is the
foundation's simple per-rank reader, ``build_data(cfg, rank, world, is_builder) ->
DataBundle``, kept for its users and tests.

Every batch is a pure function of (seed, step, micro, rank, world), so the data side of a
run has no state to checkpoint: resuming at step k replays the batches of the
uninterrupted run. Each rank reads only its own contiguous shard of the training data.

Distributed use (the text cache is built once per machine)::

    bundle = build_data(cfg, rank, world, is_builder=True) if local_rank == 0 else None
    dist.barrier()
    if local_rank != 0:
        bundle = build_data(cfg, rank, world, is_builder=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from zentrain.config import Config
from zentrain.data.corpus import DataError, expand_paths
from zentrain.data.ctr import CTRBatches, SyntheticCTR, read_criteo
from zentrain.data.loader import Loader, build_loader
from zentrain.data.text import TextBatches, prepare_text_data
from zentrain.models.ctr_layout import build_ctr_layout

__all__ = ["DataBundle", "DataError", "Loader", "build_data", "build_loader",
           "prepare_text_data"]


@dataclass
class DataBundle:
    """What the trainer needs from the data, for one rank."""

    train_batch: Callable[[int, int], dict[str, Tensor]]
    """``train_batch(step, micro)``: this rank's micro-batch (keys = the model's forward
    arguments, so ``model(**batch)`` works)."""
    eval_batches: Callable[[], list[dict[str, Tensor]]]
    """``train.eval_batches`` fixed batches of ``train.batch_size``, the same on every rank
    (empty when ``data.eval_fraction`` is 0 for text or file data)."""
    unit: str
    """What throughput counts: ``"tokens"`` or ``"samples"``."""
    items_per_batch: int
    """Units in one micro-batch (B*T tokens or B samples)."""
    describe: str
    """One line: what data, how much of it."""
    vocab_size: int | None = None
    """GPT: the tokenizer's real vocabulary size (also written to ``cfg.model.vocab_size``)."""


def build_data(cfg: Config, rank: int, world: int, is_builder: bool) -> DataBundle:
    """The data of ``cfg.model.name`` for ``rank`` of ``world``.

    GPT: builds (``is_builder``) or opens the tokenizer + token cache, and **sets
    ``cfg.model.vocab_size`` to the tokenizer's real vocabulary size** (smaller than asked
    on a small corpus), so call it before ``build_model(cfg.model)``.
    """
    if cfg.model.name == "gpt":
        return _text_bundle(cfg, rank, world, is_builder)
    if cfg.model.name == "deepfm":
        return _ctr_bundle(cfg, rank, world)
    raise DataError(f"no data for model.name {cfg.model.name!r}")


def _text_bundle(cfg: Config, rank: int, world: int, is_builder: bool) -> DataBundle:
    td = prepare_text_data(cfg, is_builder)
    cfg.model.vocab_size = td.vocab_size
    b = TextBatches(td.tokens, cfg.model.seq_len, cfg.train.batch_size, cfg.data.eval_fraction,
                    cfg.train.eval_batches, cfg.train.seed, rank, world)
    m = td.meta
    lo, hi = b.shard
    describe = (f"{m['source']}: {m['n_tokens']:,} tokens from {m['n_docs']:,} documents "
                f"({m['n_files']:,} files, {m['n_bytes'] / 1e6:.1f} MB), BPE vocab "
                f"{td.vocab_size:,}; train {b.train_len:,} / eval "
                f"{b.eval_range[1] - b.eval_range[0]:,} tokens; rank {rank} shard "
                f"{hi - lo:,} tokens")
    return DataBundle(b.train_batch, b.eval_batches, "tokens",
                      cfg.train.batch_size * cfg.model.seq_len, describe, td.vocab_size)


def _ctr_bundle(cfg: Config, rank: int, world: int) -> DataBundle:
    mc, dc, tc = cfg.model, cfg.data, cfg.train
    if dc.paths:
        files = expand_paths(dc.paths)
        arrays = read_criteo(files, mc.num_dense, mc.num_fields, build_ctr_layout(mc),
                             dc.on_error, vocab_min_count=dc.vocab_min_count)
        n = len(arrays)
        n_eval = int(n * dc.eval_fraction)
        if dc.eval_fraction > 0 and n_eval == 0:
            raise DataError(f"data.eval_fraction={dc.eval_fraction} of {n} rows leaves no "
                            f"eval rows; raise it or add data")
        train, evals = (0, n - n_eval), (n - n_eval, n)
        source = arrays
        what = f"Criteo TSV ({len(files)} files): {n:,} rows"
    else:
        n = dc.synthetic_samples
        n_eval = tc.eval_batches * tc.batch_size
        train, evals = (0, n), (n, n + n_eval)  # eval ids: a disjoint range
        layout = build_ctr_layout(mc)
        source = SyntheticCTR(mc.num_fields, mc.num_dense, layout, dc.zipf_alpha, tc.seed)
        what = (f"synthetic CTR (Zipf {dc.zipf_alpha}, {mc.num_fields} fields, "
                f"{layout.total_rows:,} rows, {mc.field_rows} sizes, {mc.id_layout} ids): "
                f"{n:,} samples")
    b = CTRBatches(source, train, evals, tc.batch_size, tc.eval_batches, tc.seed, rank, world)
    lo, hi = b.shard
    describe = (f"{what}; train {train[1] - train[0]:,} / eval {evals[1] - evals[0]:,}; "
                f"rank {rank} shard {hi - lo:,} samples")
    return DataBundle(b.train_batch, b.eval_batches, "samples", tc.batch_size, describe)
