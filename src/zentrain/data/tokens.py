"""Token streams of the GPT's text sources: one tokenizer, one token file per source.

A single source read by suffix (``format = "auto"``, the ``data.paths`` case) uses the
foundation's cache as is (``text.prepare_text_data``: ``gpt-<key>/tokens.bin``), so the
launcher, ``build_data`` and the loader share it. Several sources, or an explicit format,
get a ``mix-<key>/`` cache: the BPE is trained once on all text sources together (one
vocabulary for the whole mixture), then each source is encoded into its own
``tokens-<i>.bin``, streaming (``text.encode_corpus``), so no corpus is ever held in memory.
``meta.json`` is written last: present means complete. Locking and atomic writes are
``tokenizer.py``'s.

Formats: ``txt`` (each file is one document), ``jsonl`` (one ``{"text": ...}`` per line; a
bad line is reported as ``file:line`` and skipped or fatal per ``data.on_error``),
``parquet`` (a ``text`` column; needs ``pyarrow``; a bad row is reported as ``file: row N``),
``auto`` (``.jsonl`` by suffix, anything else text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zentrain.config import Config
from zentrain.data.badrecords import SkippedRecords, apply_on_error
from zentrain.data.corpus import (
    BadRecord,
    Budget,
    DataError,
    Document,
    Skipped,
    bad_record,
    corpus_files,
    file_documents,
    log,
    total_bytes,
)
from zentrain.data.text import encode_corpus, prepare_text_data
from zentrain.data.tokenizer import (
    EOT,
    atomic_write_text,
    build_lock,
    cache_key,
    load_or_train_tokenizer,
    open_tokenizer,
)

MIX_FORMAT = 2
"""Bump when the ``mix-`` cache layout changes (2: ``meta.json`` keeps the bad records)."""


@dataclass(frozen=True)
class TextSource:
    """A text source before tokenization."""

    name: str
    specs: tuple[str, ...]
    """Paths, globs or directories (empty: the standard library)."""
    fmt: str
    """``auto`` | ``txt`` | ``jsonl`` | ``parquet``."""


@dataclass(frozen=True)
class TokenFile:
    """A raw token-id file (picklable: workers memory-map it themselves)."""

    path: str
    dtype: str
    n_tokens: int


@dataclass
class TokenStreams:
    """The opened token caches of all text sources."""

    files: list[TokenFile]
    """One token file per text source, in source order."""
    vocab_size: int
    """The tokenizer's real vocabulary size."""
    meta: list[dict[str, Any]]
    """Per source: n_files, n_bytes, n_docs, n_tokens."""


def _source_files(src: TextSource) -> list[Path]:
    return corpus_files(dataclasses.replace(Config().data, paths=list(src.specs)))


def prepare_token_streams(cfg: Config, sources: list[TextSource],
                          is_builder: bool) -> TokenStreams:
    """Build (``is_builder``, under the cache lock) or open the token streams of ``sources``."""
    if len(sources) == 1 and sources[0].fmt == "auto":
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                paths=list(sources[0].specs)))
        td = prepare_text_data(one, is_builder)
        meta = {k: td.meta[k] for k in ("n_files", "n_bytes", "n_docs", "n_tokens")}
        tf = TokenFile(str(td.cache / "tokens.bin"), td.meta["dtype"], td.meta["n_tokens"])
        return TokenStreams([tf], td.vocab_size, [meta])
    files = [_source_files(s) for s in sources]
    cache = mix_cache_dir(cfg, sources, files)
    if is_builder:
        with build_lock(cache):
            if not (cache / "meta.json").is_file():
                _build(cfg, sources, files, cache)
    meta_path = cache / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"token cache {cache} is not built: the builder rank must build it "
                        "before the others open it")
    meta = json.loads(meta_path.read_text())
    apply_on_error(meta, cache.name, f"text sources {', '.join(s.name for s in sources)}",
                   cfg.data.on_error, listing=is_builder)
    out = []
    for i, m in enumerate(meta["sources"]):
        tf = TokenFile(str(cache / f"tokens-{i}.bin"), meta["dtype"], m["n_tokens"])
        size = Path(tf.path).stat().st_size
        if size != tf.n_tokens * np.dtype(tf.dtype).itemsize:
            raise DataError(f"token cache {tf.path} is corrupt (size does not match "
                            f"meta.json); delete {cache} to rebuild it")
        out.append(tf)
    vocab = open_tokenizer(cache).get_vocab_size()
    return TokenStreams(out, vocab, meta["sources"])


def mix_cache_dir(cfg: Config, sources: list[TextSource], files: list[list[Path]]) -> Path:
    """``mix-<key>``: the key covers every file (path, size, mtime), how files group into
    sources and their formats, the vocabulary size and ``max_bytes``."""
    flat = [p for fs in files for p in fs]
    h = hashlib.sha256(cache_key(flat, cfg.model.vocab_size, cfg.data.max_bytes).encode())
    h.update(json.dumps([MIX_FORMAT, [[s.fmt, len(fs)] for s, fs in zip(sources, files)]])
             .encode())
    return Path(cfg.data.cache_dir).expanduser() / f"mix-{h.hexdigest()[:16]}"


def _build(cfg: Config, sources: list[TextSource], files: list[list[Path]],
           cache: Path) -> None:
    data, show = cfg.data, cfg.metrics.progress
    sizes = [total_bytes(fs, data.max_bytes) for fs in files]
    for s, fs in zip(sources, files):  # fail early (and clearly) on an empty source
        if next(read_documents(fs, s.fmt, data.max_bytes, data.on_error, None), None) is None:
            raise DataError(f"data source {s.name!r} is empty: no text documents in "
                            f"{', '.join(s.specs) or 'the standard library'}")
    # Bad records are listed as the tokenizer's pass meets them, and kept from the encoding
    # pass (the one pass that always runs) for meta.json, so a later run that reuses this
    # cache re-reports them, or fails under on_error = "fail".
    live = SkippedRecords(listing=True)
    everything = itertools.chain.from_iterable(
        read_documents(fs, s.fmt, data.max_bytes, data.on_error, None, live)
        for s, fs in zip(sources, files))
    tok = load_or_train_tokenizer(cache, everything, cfg.model.vocab_size, sum(sizes), show)
    skipped = SkippedRecords()
    metas = []
    for i, (s, fs) in enumerate(zip(sources, files)):
        docs = read_documents(fs, s.fmt, data.max_bytes, data.on_error, None, skipped)
        m = encode_corpus(tok, docs, cache / f"tokens-{i}.bin", sizes[i], show)
        metas.append({"name": s.name, "n_files": len(fs), "n_bytes": sizes[i],
                      "n_docs": m["n_docs"], "n_tokens": m["n_tokens"], "dtype": m["dtype"]})
    dtype = metas[0]["dtype"]
    atomic_write_text(cache / "meta.json", json.dumps(
        {"sources": metas, "dtype": dtype, "vocab_size": tok.get_vocab_size(),
         "eot_id": tok.token_to_id(EOT), **skipped.meta()}, indent=1))


# --- documents by format ------------------------------------------------------------------------

def read_documents(files: list[Path], fmt: str, max_bytes: int = 0, on_error: str = "skip",
                   report: Callable[[str], None] | None = log.warning,
                   skipped: Skipped | None = None) -> Iterator[Document]:
    """The documents of ``files`` read as ``fmt``, stopping after ``max_bytes`` of input;
    streamed (``corpus.file_documents``). Skipped records go to ``report`` (as lines) and
    ``skipped``."""
    budget = Budget(max_bytes)
    for path in files:
        if budget.spent:
            return
        if fmt == "parquet":
            for doc in _parquet_docs(path, on_error, report, skipped):
                if budget.spent:
                    return
                budget.take(doc.nbytes)
                yield doc
            continue
        jsonl = fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl")
        yield from file_documents(path, jsonl, budget, on_error, report, skipped)


def _parquet_docs(path: Path, on_error: str, report: Callable[[str], None] | None,
                  skipped: Skipped | None) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        bad_record(BadRecord(str(path), 0, f"not a parquet file ({str(e).splitlines()[0]})"),
                   on_error, report, skipped)
        return
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: "
                        f"{', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                bad_record(BadRecord(str(path), row, f"bad parquet record (text is "
                                     f"{type(value).__name__}, expected a string)", "row"),
                           on_error, report, skipped)
                continue
            if value:
                yield Document(value, len(value.encode("utf-8", errors="replace")))
