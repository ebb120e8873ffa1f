"""Criteo TSV streamed from disk: a byte-offset index of the valid rows, rows read on demand.

A Criteo day is ~45M rows (~11 GB); the foundation's ``read_criteo`` holds every row in
memory. Here one pass over the files writes ``index.u64``: two uint64 per *valid* row,
``file << 48 | byte offset`` and the line's length, streamed to disk in chunks. The index is
memory-mapped (16 bytes a row, paged in by the OS on demand), and a sample is read with one
``os.pread`` and parsed when a batch needs it, so a rank's memory does not grow with the
data.

Every row is validated during the indexing pass, so bad rows never enter the index: each
is reported as ``file:line`` and skipped, or fatal under ``data.on_error = "fail"``. The
first bad rows are kept in ``meta.json`` and re-reported whenever a cached index is
opened, so a reused cache never hides them.

Cache: ``data.cache_dir/criteo-<key>/`` where ``key`` covers each file's path, size and
mtime and the column layout; ``meta.json`` is written last (present = complete).

With ``model.id_layout = "frequency"`` a second pass counts every field's values over the
indexed rows and keeps a frequency vocabulary (``criteo_vocab``) in ``vocab-<key>/`` of the
same cache, keyed by the field sizes and ``data.vocab_min_count``; built once, under the
same lock, by the builder, and memory-mapped by every reader. Otherwise categories are
hashed (``ctr.hash_categories``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zentrain.data.corpus import DataError, log
from zentrain.data.criteo_vocab import CriteoVocab, ValueCounts, vocab_from_counts
from zentrain.data.ctr import _parse_line, as_layout, hash_categories
from zentrain.data.tokenizer import atomic_write_text, build_lock, tmp_path
from zentrain.models.ctr_layout import CTRLayout

INDEX_FORMAT = 1
VOCAB_FORMAT = 1
_OFFSET_BITS = 48
_KEEP_BAD = 50  # bad rows remembered in meta.json for re-reporting
_CHUNK = 1 << 16  # index rows buffered before they are written


@dataclass(frozen=True)
class CriteoIndex:
    """A built index (picklable; workers open it themselves)."""

    files: tuple[str, ...]
    path: str
    """The ``index.u64`` file: [n_rows, 2] uint64."""
    n_rows: int
    vocab: str | None = None
    """The frequency vocabulary's directory (None: categories are hashed)."""


def index_dir(files: list[Path], num_dense: int, num_fields: int, cache_dir: str) -> Path:
    h = hashlib.sha256(json.dumps([INDEX_FORMAT, num_dense, num_fields]).encode())
    for p in files:
        st = p.stat()
        h.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return Path(cache_dir).expanduser() / f"criteo-{h.hexdigest()[:16]}"


def prepare_criteo_index(files: list[Path], num_dense: int, num_fields: int, cache_dir: str,
                         on_error: str, is_builder: bool,
                         report: Callable[[str], None] | None = log.warning,
                         layout: CTRLayout | None = None,
                         vocab_min_count: int = 2) -> CriteoIndex:
    """Build (``is_builder``, under the cache lock) or open the index of ``files``, and
    with a ``frequency`` ``layout`` its vocabulary.

    Bad rows are reported through ``report`` (the builder's, again on every open of a
    cached index) or, with ``on_error == "fail"``, raise ``DataError`` naming ``file:line``.
    """
    if len(files) >= 1 << 16:
        raise DataError(f"too many Criteo files ({len(files)}; at most 65535 per source)")
    cache = index_dir(files, num_dense, num_fields, cache_dir)
    meta_path = cache / "meta.json"
    if is_builder:
        with build_lock(cache):
            if not meta_path.is_file():
                _build(files, num_dense, num_fields, cache, on_error, report)
            elif report is not None or on_error == "fail":
                _rereport(json.loads(meta_path.read_text()), on_error, report)
    if not meta_path.is_file():
        raise DataError(f"Criteo index {cache} is not built: the builder rank must build it "
                        "before the others open it")
    meta = json.loads(meta_path.read_text())
    if meta["n_rows"] == 0:
        raise DataError(f"no valid Criteo rows in {', '.join(map(str, files))}")
    index = CriteoIndex(tuple(str(p) for p in files), str(cache / "index.u64"), meta["n_rows"])
    if layout is None or layout.ids != "frequency":
        return index
    if vocab_min_count < 1:
        raise DataError(f"data.vocab_min_count={vocab_min_count}; must be >= 1")
    vdir = vocab_dir(cache, layout, vocab_min_count)
    if is_builder:
        with build_lock(vdir):
            if not (vdir / "meta.json").is_file():
                _build_vocab(index, num_dense, num_fields, layout, vocab_min_count, vdir)
    if not (vdir / "meta.json").is_file():
        raise DataError(f"Criteo vocabulary {vdir} is not built: the builder rank must build "
                        "it before the others open it")
    return CriteoIndex(index.files, index.path, index.n_rows, str(vdir))


def vocab_dir(cache: Path, layout: CTRLayout, min_count: int) -> Path:
    key = json.dumps([VOCAB_FORMAT, list(layout.field_rows), min_count])
    return cache / f"vocab-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build_vocab(index: CriteoIndex, num_dense: int, num_fields: int, layout: CTRLayout,
                 min_count: int, out: Path) -> None:
    """Count every field's values over the indexed rows (file order), then keep the
    vocabulary. Rows are read through the index, so bad rows are skipped as in training."""
    # Only raw values are read (``raw``), so the reader's own id layout does not matter:
    # hashed, which needs no vocabulary (the one being built).
    rows = CriteoRows(index, num_dense, num_fields, layout.field_rows[0])
    counts = ValueCounts(num_fields)
    try:
        for lo in range(0, index.n_rows, _CHUNK):
            counts.add(rows.raw(np.arange(lo, min(lo + _CHUNK, index.n_rows)))[2])
    finally:
        rows.close()
    vocab = vocab_from_counts(counts, layout.field_rows, min_count)
    vocab.save(out)
    atomic_write_text(out / "meta.json", json.dumps(
        {"field_rows": list(layout.field_rows), "min_count": min_count,
         "n_rows": index.n_rows, "vocab_sizes": np.diff(vocab.bounds).tolist()}))


def _rereport(meta: dict, on_error: str, report: Callable[[str], None] | None) -> None:
    bad, n_bad = meta["bad"], meta["n_bad"]
    if not n_bad:
        return
    if on_error == "fail":
        raise DataError(f"{bad[0]}; set data.on_error='skip' to skip such rows")
    if report is not None:
        for line in bad:
            report(f"{line}, skipped (cached index)")
        if n_bad > len(bad):
            report(f"... and {n_bad - len(bad)} more bad Criteo rows, skipped (cached index)")


def _build(files: list[Path], num_dense: int, num_fields: int, cache: Path, on_error: str,
           report: Callable[[str], None] | None) -> None:
    out = cache / "index.u64"
    tmp = tmp_path(out)
    n_rows, bad, n_bad = 0, [], 0
    try:
        with open(tmp, "wb") as idx:
            buf: list[tuple[int, int]] = []
            for fid, path in enumerate(files):
                offset = 0
                with open(path, "rb") as f:
                    for lineno, raw in enumerate(f, start=1):
                        start, offset = offset, offset + len(raw)
                        line = raw.decode("utf-8", errors="replace")
                        if not line.strip():
                            continue
                        try:
                            _parse_line(line, num_dense, num_fields)
                        except ValueError as e:
                            msg = f"{path}:{lineno}: bad Criteo row ({e})"
                            if on_error == "fail":
                                raise DataError(msg + "; set data.on_error='skip' to skip "
                                                "such rows") from None
                            if report is not None:
                                report(msg + ", skipped")
                            n_bad += 1
                            if len(bad) < _KEEP_BAD:
                                bad.append(msg)
                            continue
                        buf.append((fid << _OFFSET_BITS | start, len(raw)))
                        if len(buf) >= _CHUNK:
                            np.asarray(buf, dtype=np.uint64).tofile(idx)
                            n_rows += len(buf)
                            buf = []
            if buf:
                np.asarray(buf, dtype=np.uint64).tofile(idx)
                n_rows += len(buf)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(cache / "meta.json", json.dumps(
        {"files": [str(p) for p in files], "n_rows": n_rows, "n_bad": n_bad, "bad": bad},
        indent=1))


class CriteoRows:
    """Rows of an index read on demand: ``take(i)`` -> dense / cats / labels arrays.

    ``layout`` (or an int: rows per field, hashed) sets the per-field ids; a ``frequency``
    layout needs an index prepared with it (its vocabulary)."""

    def __init__(self, index: CriteoIndex, num_dense: int, num_fields: int,
                 layout: CTRLayout | int) -> None:
        self.index, self.num_dense, self.num_fields = index, num_dense, num_fields
        self.layout = as_layout(num_fields, layout)
        self.vocab = None
        if self.layout.ids == "frequency":
            if index.vocab is None:
                raise DataError("frequency ids need the index's vocabulary: call "
                                "prepare_criteo_index with the layout")
            self.vocab = CriteoVocab.load(Path(index.vocab), self.layout.field_rows)
        self.table = np.memmap(index.path, dtype=np.uint64, mode="r", shape=(index.n_rows, 2))
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.index.n_rows

    def _fd(self, fid: int) -> int:
        fd = self._fds.get(fid)
        if fd is None:
            fd = self._fds[fid] = os.open(self.index.files[fid], os.O_RDONLY)
        return fd

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        labels, ints, raw = self.raw(idx)
        cats = (self.vocab.apply(raw) if self.vocab is not None
                else hash_categories(raw, self.layout.field_rows))
        return {"dense": np.log1p(ints).astype(np.float32), "cats": cats, "labels": labels}

    def raw(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``idx`` as parsed: labels, dense ints and raw uint64 category values."""
        entries = self.table[np.asarray(idx, dtype=np.int64)]
        n = len(entries)
        labels = np.empty(n, dtype=np.float32)
        ints = np.empty((n, self.num_dense), dtype=np.float64)
        raw = np.empty((n, self.num_fields), dtype=np.uint64)
        # Read in file-offset order (friendlier to the disk), store in batch order.
        for j in np.argsort(entries[:, 0], kind="stable"):
            packed, length = int(entries[j, 0]), int(entries[j, 1])
            fid, offset = packed >> _OFFSET_BITS, packed & ((1 << _OFFSET_BITS) - 1)
            line = os.pread(self._fd(fid), length, offset).decode("utf-8", errors="replace")
            try:
                y, x, c = _parse_line(line, self.num_dense, self.num_fields)
            except ValueError as e:  # the file changed under a cached index
                raise DataError(f"{self.index.files[fid]}: row at byte {offset} no longer "
                                f"parses ({e}); the file changed after indexing") from None
            labels[j] = y
            ints[j] = x
            raw[j] = c
        return labels, ints, raw

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
