"""GPT data: the corpus encoded once into a token memmap, and stateless per-rank batches.

Building (``prepare_text_data(cfg, is_builder=True)``, local rank 0 only): train or load the
BPE tokenizer, encode every document with ``encode_batch`` (``EOT`` after each), stream the
ids into ``tokens.bin`` (uint16 when the vocabulary fits, else uint32), then write
``meta.json`` last. ``meta.json`` existing means the cache is complete. The other ranks
wait at a barrier, then call ``prepare_text_data(cfg, is_builder=False)``, which only opens.

Batches (``TextBatches``): the token stream's contiguous tail (``data.eval_fraction``) is the
eval range; the rest is split into ``world`` contiguous shards and rank ``r`` samples
random ``seq_len + 1`` windows inside shard ``r`` only, so ranks never read each other's
tokens. A batch is a pure function of (seed, step, micro, rank, world): resuming at step k
replays exactly the batches of the uninterrupted run, with no loader state to save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from zentrain.config import Config
from zentrain.data.badrecords import SkippedRecords, apply_on_error
from zentrain.data.corpus import (
    DataError,
    Document,
    corpus_files,
    files_within,
    iter_documents,
    total_bytes,
)
from zentrain.data.tokenizer import (
    EOT,
    atomic_write_text,
    build_lock,
    cache_key,
    load_or_train_tokenizer,
    open_tokenizer,
    progress_bar,
    tmp_path,
)

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
ENCODE_CHUNK_BYTES = 4 << 20  # text handed to one encode_batch call
_TRAIN_STREAM, _EVAL_STREAM = 0x7E47, 0xE7A1  # separate RNG streams for train and eval
_EVAL_SEED = 20240917  # eval windows do not depend on train.seed: runs stay comparable


@dataclass
class TextData:
    """An opened token cache."""

    tokens: np.ndarray
    """All token ids, documents separated by ``eot_id`` (a read-only memmap)."""
    tokenizer: Tokenizer
    """The trained byte-level BPE."""
    vocab_size: int
    """The tokenizer's real vocabulary size (the GPT's embedding rows)."""
    eot_id: int
    """Id of the end-of-text token."""
    meta: dict[str, Any]
    """What was encoded: files, bytes, documents, tokens, dtype."""
    cache: Path
    """The cache directory."""


def text_cache_dir(cfg: Config, files: list[Path] | None = None) -> Path:
    """The cache directory of this config's corpus + vocabulary + ``max_bytes``."""
    files = corpus_files(cfg.data) if files is None else files
    key = cache_key(files, cfg.model.vocab_size, cfg.data.max_bytes)
    return Path(cfg.data.cache_dir).expanduser() / f"gpt-{key}"


def prepare_text_data(cfg: Config, is_builder: bool) -> TextData:
    """Build the tokenizer + token memmap if ``is_builder`` and missing, then open them.

    Distributed use: local rank 0 calls with ``is_builder=True``, every rank meets at a
    barrier, then the others call with ``is_builder=False`` (which never writes and fails
    clearly if the cache is absent).
    """
    files = corpus_files(cfg.data)
    cache = text_cache_dir(cfg, files)
    if is_builder:
        with build_lock(cache):
            if not (cache / META_FILE).is_file():
                _build(cfg, files, cache)
    td = open_text_data(cache)
    # The cache outlives the run that built it: apply this run's on_error to its bad records.
    apply_on_error(td.meta, cache.name, f"text data ({td.meta['source']})", cfg.data.on_error,
                   listing=is_builder)
    return td


def open_text_data(cache: Path) -> TextData:
    """Open a complete token cache (``meta.json`` present)."""
    meta_path = cache / META_FILE
    if not meta_path.is_file():
        raise DataError(f"token cache {cache} is not built: the builder rank must call "
                        f"prepare_text_data(cfg, is_builder=True) before the others open it")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    path = cache / TOKENS_FILE
    if path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise DataError(f"token cache {path} is corrupt (size does not match {META_FILE}); "
                        f"delete {cache} to rebuild it")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    tok = open_tokenizer(cache)
    return TextData(tokens, tok, tok.get_vocab_size(), tok.token_to_id(EOT), meta, cache)


def _build(cfg: Config, files: list[Path], cache: Path) -> None:
    data, show = cfg.data, cfg.metrics.progress
    files = files_within(files, data.max_bytes)
    nbytes = total_bytes(files, data.max_bytes)
    if next(iter_documents(files, data.max_bytes, data.on_error, None), None) is None:
        where = ", ".join(data.paths) if data.paths else "the standard library"
        raise DataError(f"the corpus is empty: no text documents in {where}")
    # Bad records: listed as the tokenizer's pass meets them, kept from the encoding pass
    # (the one that always runs) in meta.json for the runs that reuse this cache.
    live = SkippedRecords(listing=True)
    tok = load_or_train_tokenizer(cache, iter_documents(files, data.max_bytes, data.on_error,
                                                        None, live),
                                  cfg.model.vocab_size, nbytes, show)
    skipped = SkippedRecords()
    docs = iter_documents(files, data.max_bytes, data.on_error, None, skipped)
    meta = encode_corpus(tok, docs, cache / TOKENS_FILE, nbytes, show)
    meta.update(skipped.meta())
    meta.update(n_files=len(files), n_bytes=nbytes, vocab_size=tok.get_vocab_size(),
                source=", ".join(data.paths) if data.paths else "python stdlib")
    atomic_write_text(cache / META_FILE, json.dumps(meta, indent=1))


def encode_corpus(tok: Tokenizer, docs: Any, out: Path, nbytes: int,
                  progress: bool = True) -> dict[str, Any]:
    """Encode ``docs`` (Documents) into the raw id file ``out`` (atomically); returns meta."""
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # same ids, no offsets
    n_tokens = n_docs = 0
    tmp = tmp_path(out)
    try:
        with open(tmp, "wb") as f, progress_bar(progress) as bar:
            task = bar.add_task("encoding corpus", total=nbytes)

            def flush(chunk: list[Document]) -> int:
                ids: list[int] = []
                for d, enc in zip(chunk, encode([d.text for d in chunk],
                                                add_special_tokens=False)):
                    ids.extend(enc.ids)
                    if d.end:  # not after a piece of a large file: its document goes on
                        ids.append(eot)
                np.asarray(ids, dtype=dtype).tofile(f)
                bar.advance(task, sum(d.nbytes for d in chunk))
                return len(ids)

            chunk: list[Document] = []
            size = 0
            for doc in docs:
                chunk.append(doc)
                size += doc.nbytes
                n_docs += doc.end
                if size >= ENCODE_CHUNK_BYTES:
                    n_tokens += flush(chunk)
                    chunk, size = [], 0
            if chunk:
                n_tokens += flush(chunk)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"n_tokens": n_tokens, "n_docs": n_docs, "dtype": np.dtype(dtype).name}


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([k % (1 << 64)
                                                                       for k in key])))


class TextBatches:
    """Stateless GPT batches ``{"idx": [B, T], "targets": [B, T]}`` for one rank."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, eval_fraction: float,
                 eval_batches: int, seed: int, rank: int, world: int) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world, self.n_eval_batches = seed, rank, world, eval_batches
        n = len(tokens)
        n_eval = int(n * eval_fraction)
        window = seq_len + 1
        if 0 < eval_fraction and n_eval < window:
            raise DataError(f"the eval range (data.eval_fraction={eval_fraction} of {n:,} tokens "
                            f"= {n_eval:,}) is shorter than model.seq_len+1 = {window}; raise "
                            f"data.eval_fraction or use more data")
        self.train_len = n - n_eval
        self.eval_range = (self.train_len, n)
        min_shard = self.train_len // world
        if min_shard < window:
            raise DataError(
                f"--nproc {world} larger than the data allows: {self.train_len:,} training "
                f"tokens split into {world} shards of {min_shard:,} tokens, fewer than "
                f"model.seq_len+1 = {window}; use fewer processes, a shorter seq_len or more data")
        self.shard = (rank * self.train_len // world, (rank + 1) * self.train_len // world)
        self._eval: list[dict[str, Tensor]] | None = None

    def _windows(self, starts: np.ndarray) -> dict[str, Tensor]:
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        t = torch.from_numpy(rows)
        return {"idx": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()}

    def train_batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """Micro-batch ``micro`` of optimizer step ``step`` for this rank."""
        lo, hi = self.shard
        rng = _rng(_TRAIN_STREAM, self.seed, step, micro, self.rank, self.world)
        return self._windows(rng.integers(lo, hi - self.seq_len, size=self.batch_size))

    def eval_batches(self) -> list[dict[str, Tensor]]:
        """The fixed eval batches (identical on every rank and in every run)."""
        if self._eval is None:
            lo, hi = self.eval_range
            if hi == lo:
                self._eval = []
            else:
                rng = _rng(_EVAL_STREAM, _EVAL_SEED)
                starts = rng.integers(lo, hi - self.seq_len,
                                      size=(self.n_eval_batches, self.batch_size))
                self._eval = [self._windows(s) for s in starts]
        return self._eval
