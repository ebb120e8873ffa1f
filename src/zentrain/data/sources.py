"""Source readers: each configured dataset as an indexable sample space.

A source is resolved once (in the training process: files found, caches built or opened,
sizes known) into a ``Source`` whose ``recipe`` is small and picklable; every loader worker
``open()``s the recipe itself (memory maps, file descriptors), so no data crosses process
boundaries except finished batches. Readers answer ``take(indices)`` with numpy arrays.

* GPT (``TokenWindows``): a sample is one window of ``seq_len + 1`` tokens; window ``j`` of a
  token file starts at token ``j * seq_len`` (windows overlap by the one token that is both
  the last target of one and the first input of the next), so an epoch reads every token
  once and packs documents back to back, separated by end-of-text. Text formats (txt,
  jsonl, parquet) are tokenized into cached token files (``tokens.py``); ``bin`` files are
  raw pre-tokenized ids, used in place. Windows never cross file boundaries.
* DeepFM: a sample is one click row; ``criteo`` rows are streamed by byte offset
  (``criteo_index.py``), ``synthetic`` rows are generated from (seed, index).

Each source's samples ``[0, n_train)`` are for training and ``[n_train, n_train + n_eval)``
for evaluation (the tail ``data.eval_fraction`` of a file source, or ids past the
training range for the synthetic generator).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from zentrain.config import Config, ConfigError, SourceConfig
from zentrain.data.badrecords import ReportedLines, announce
from zentrain.data.corpus import DataError, expand_paths
from zentrain.data.criteo_index import CriteoIndex, CriteoRows, prepare_criteo_index
from zentrain.data.ctr import SyntheticCTR
from zentrain.data.plan import mix_key
from zentrain.data.tokens import TextSource, TokenFile, prepare_token_streams
from zentrain.models.ctr_layout import CTRLayout, build_ctr_layout

TEXT_FORMATS = ("auto", "txt", "jsonl", "parquet", "bin")
CTR_FORMATS = ("auto", "criteo", "synthetic")


class Reader(Protocol):
    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]: ...


# --- readers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRecipe:
    files: tuple[TokenFile, ...]
    seq_len: int
    vocab_size: int
    """Token ids must be below this (checked per batch: a ``bin`` file may hold anything)."""

    def windows(self) -> list[int]:
        return [max(0, (f.n_tokens - 1) // self.seq_len) for f in self.files]

    def open(self) -> TokenWindows:
        return TokenWindows(self)


class TokenWindows:
    def __init__(self, recipe: TokenRecipe) -> None:
        self.recipe, self.seq_len = recipe, recipe.seq_len
        self.maps = [np.memmap(f.path, dtype=np.dtype(f.dtype), mode="r", shape=(f.n_tokens,))
                     if f.n_tokens else np.zeros(0, np.uint16) for f in recipe.files]
        self.ends = np.cumsum(recipe.windows())  # window j lives in the file whose end > j

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        rows = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        fid = np.searchsorted(self.ends, idx, side="right")
        offsets = np.arange(self.seq_len + 1)
        for f in np.unique(fid):
            sel = fid == f
            local = idx[sel] - (self.ends[f - 1] if f else 0)
            rows[sel] = self.maps[f][local[:, None] * self.seq_len + offsets]
            top = int(rows[sel].max())
            if top >= self.recipe.vocab_size:
                bad = int(np.argmax(rows[sel].max(1)))
                raise DataError(f"{self.recipe.files[f].path}: token id {top} at token "
                                f"{int(local[bad]) * self.seq_len} is >= the vocabulary size "
                                f"{self.recipe.vocab_size} (wrong token_dtype or "
                                f"model.vocab_size?)")
        return {"idx": rows[:, :-1], "targets": rows[:, 1:]}


@dataclass(frozen=True)
class CriteoRecipe:
    index: CriteoIndex
    num_dense: int
    num_fields: int
    layout: CTRLayout

    def open(self) -> CriteoRows:
        return CriteoRows(self.index, self.num_dense, self.num_fields, self.layout)


@dataclass(frozen=True)
class SyntheticRecipe:
    num_fields: int
    num_dense: int
    layout: CTRLayout
    zipf_alpha: float
    seed: int

    def open(self) -> SyntheticRows:
        return SyntheticRows(self)


class SyntheticRows:
    def __init__(self, r: SyntheticRecipe) -> None:
        self.gen = SyntheticCTR(r.num_fields, r.num_dense, r.layout, r.zipf_alpha, r.seed)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.gen.take(np.asarray(idx, np.int64)).items()}


# --- resolved sources ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A configured dataset, resolved: where its samples are and how many."""

    name: str
    fmt: str
    recipe: Any
    """``TokenRecipe`` | ``CriteoRecipe`` | ``SyntheticRecipe`` (picklable; ``open()``)."""
    n_train: int
    n_eval: int
    config: SourceConfig
    """Its weight schedule."""
    what: str
    """One phrase for ``describe``."""


@dataclass
class Resolved:
    sources: list[Source]
    kind: str
    """``"text"`` (GPT) or ``"ctr"`` (DeepFM)."""
    vocab_size: int | None
    """GPT: the tokenizer's vocabulary (None when every source is pre-tokenized)."""


def source_entries(cfg: Config) -> list[tuple[SourceConfig, tuple[str, ...]]]:
    """Each source's config and path specs: ``data.sources``, or one source made of all of
    ``data.paths`` when there are none."""
    if cfg.data.sources:
        return [(sc, (sc.path,) if sc.path else ()) for sc in cfg.data.sources]
    return [(SourceConfig(), tuple(cfg.data.paths))]


def _default_name(i: int, sc: SourceConfig, specs: tuple[str, ...], fmt: str,
                  taken: set[str]) -> str:
    if sc.name:
        return sc.name
    if not specs:
        name = "stdlib" if fmt in TEXT_FORMATS else "synthetic"
    elif len(specs) == 1 and not glob.has_magic(specs[0]):
        name = Path(specs[0]).stem or f"source{i}"
    else:
        name = f"source{i}"
    return name if name not in taken else f"{name}{i}"


def _format(i: int, sc: SourceConfig, model: str, files: list[Path]) -> str:
    allowed = TEXT_FORMATS if model == "gpt" else CTR_FORMATS
    key = f"data.sources[{i}].format"
    if sc.format not in allowed:
        raise ConfigError(f"bad value for {key}: {sc.format!r} does not fit model.name="
                          f"{model!r} (allowed: {' | '.join(map(repr, allowed))})")
    if sc.format != "auto":
        return sc.format
    if model == "deepfm":
        return "criteo" if files else "synthetic"
    suffixes = {p.suffix for p in files}
    for fmt in ("bin", "parquet"):
        if suffixes == {f".{fmt}"}:
            return fmt
        if f".{fmt}" in suffixes:
            raise ConfigError(f"data.sources[{i}] mixes .{fmt} files with others; split it "
                              f"into sources or set {key}")
    return "auto"


def resolve_sources(cfg: Config, is_builder: bool) -> Resolved:
    """Find every source's files, build or open their caches, and size them."""
    mc, dc = cfg.model, cfg.data
    entries = source_entries(cfg)
    configs = [sc for sc, _ in entries]
    specs_of = [specs for _, specs in entries]
    files, fmts, names = [], [], []
    for i, (sc, specs) in enumerate(entries):
        if sc.format == "synthetic" and specs:
            raise ConfigError(f"data.sources[{i}] has format 'synthetic' and a path")
        fs = expand_paths(list(specs)) if specs else []
        fmt = _format(i, sc, mc.name, fs)
        files.append(fs)
        fmts.append(fmt)
        names.append(_default_name(i, sc, specs, fmt, set(names)))
    if mc.name == "gpt":
        return _resolve_text(cfg, configs, specs_of, files, fmts, names, is_builder)
    out = []
    for i, (sc, fs, fmt, name) in enumerate(zip(configs, files, fmts, names)):
        if fmt == "synthetic":
            seed = cfg.train.seed if i == 0 else mix_key(cfg.train.seed, i)
            r: Any = SyntheticRecipe(mc.num_fields, mc.num_dense, build_ctr_layout(mc),
                                     dc.zipf_alpha, seed)
            n_train = dc.synthetic_samples
            n_eval = cfg.train.eval_batches * cfg.train.batch_size if dc.eval_fraction else 0
            what = f"synthetic CTR (Zipf {dc.zipf_alpha}): {n_train:,} samples"
        else:
            lines = ReportedLines()
            idx = prepare_criteo_index(fs, mc.num_dense, mc.num_fields, dc.cache_dir,
                                       dc.on_error, is_builder,
                                       report=lines if is_builder else None,
                                       layout=build_ctr_layout(mc),
                                       vocab_min_count=dc.vocab_min_count)
            _apply_criteo(idx, name, lines, dc.on_error, is_builder)
            r = CriteoRecipe(idx, mc.num_dense, mc.num_fields, build_ctr_layout(mc))
            n_eval = int(idx.n_rows * dc.eval_fraction)
            n_train = idx.n_rows - n_eval
            what = f"Criteo TSV ({len(fs)} files): {idx.n_rows:,} rows"
        _check_train(name, n_train, "rows")
        out.append(Source(name, fmt, r, n_train, n_eval, sc, what))
    if dc.eval_fraction > 0 and not any(s.n_eval for s in out):
        raise DataError(f"data.eval_fraction={dc.eval_fraction} leaves no eval rows "
                        f"({', '.join(s.what for s in out)}); raise it or add data")
    return Resolved(out, "ctr", None)


def _apply_criteo(idx: CriteoIndex, name: str, lines: ReportedLines, on_error: str,
                  is_builder: bool) -> None:
    """The builder says the index's bad rows once per process tree (a fresh index and a
    cached one alike), with their count from the index's meta.json; under "fail" the other
    ranks stop too (the builder's open already raised)."""
    cache = Path(idx.path).parent
    try:
        meta = json.loads((cache / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    n_bad = max(int(meta.get("n_bad", 0)), lines.count)
    if on_error == "fail" and n_bad and meta.get("bad"):
        raise DataError(f"{meta['bad'][0]}; set data.on_error='skip' to skip such rows")
    if is_builder:
        announce(cache.name, f"Criteo source {name!r}", lines.kept, n_bad)


def _check_train(name: str, n_train: int, unit: str) -> None:
    if n_train < 1:
        raise DataError(f"data source {name!r} has no training {unit} left after "
                        "data.eval_fraction; add data or lower data.eval_fraction")


def _resolve_text(cfg: Config, configs: list[SourceConfig], specs: list[tuple[str, ...]],
                  files: list[list[Path]],
                  fmts: list[str], names: list[str], is_builder: bool) -> Resolved:
    mc, dc = cfg.model, cfg.data
    text = [i for i, f in enumerate(fmts) if f != "bin"]
    vocab: int | None = None
    token_files: dict[int, list[TokenFile]] = {}
    what: dict[int, str] = {}
    if text:
        streams = prepare_token_streams(
            cfg, [TextSource(names[i], specs[i], fmts[i]) for i in text], is_builder)
        vocab = streams.vocab_size
        for i, tf, m in zip(text, streams.files, streams.meta):
            token_files[i] = [tf]
            where = ", ".join(specs[i]) or "python stdlib"
            what[i] = (f"{where}: {m['n_tokens']:,} tokens from {m['n_docs']:,} documents "
                       f"({m['n_files']:,} files, {m['n_bytes'] / 1e6:.1f} MB)")
    for i, f in enumerate(fmts):
        if f == "bin":
            dtype = np.dtype(configs[i].token_dtype)
            tfs = []
            for p in files[i]:
                size = p.stat().st_size
                if size % dtype.itemsize:
                    raise DataError(f"{p}: {size} bytes is not a whole number of "
                                    f"{dtype.name} token ids (data.sources[{i}].token_dtype)")
                tfs.append(TokenFile(str(p), dtype.name, size // dtype.itemsize))
            token_files[i] = tfs
            what[i] = (f"{len(tfs)} pre-tokenized .bin files: "
                       f"{sum(t.n_tokens for t in tfs):,} tokens")
    out = []
    for i, sc in enumerate(configs):
        r = TokenRecipe(tuple(token_files[i]), mc.seq_len, vocab or mc.vocab_size)
        n = sum(r.windows())
        n_eval = int(n * dc.eval_fraction)
        if n - n_eval < 1:
            raise DataError(f"data source {names[i]!r} is too small: {n:,} windows of "
                            f"model.seq_len+1 = {mc.seq_len + 1} tokens, {n_eval:,} of them "
                            "held out for eval; add data or use a shorter seq_len")
        out.append(Source(names[i], fmts[i], r, n - n_eval, n_eval, sc, what[i]))
    if dc.eval_fraction > 0 and not any(s.n_eval for s in out):
        raise DataError(f"the eval range (data.eval_fraction={dc.eval_fraction}) holds no "
                        f"window of model.seq_len+1 = {mc.seq_len + 1} tokens; raise "
                        "data.eval_fraction or use more data")
    return Resolved(out, "text", vocab)


# --- batches ------------------------------------------------------------------------------------

def batch_layout(kind: str, cfg: Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-sample shape and dtype of every batch field (the model's forward arguments)."""
    if kind == "text":
        t = (cfg.model.seq_len,)
        return {"idx": (t, np.dtype(np.int64)), "targets": (t, np.dtype(np.int64))}
    return {"dense": ((cfg.model.num_dense,), np.dtype(np.float32)),
            "cats": ((cfg.model.num_fields,), np.dtype(np.int64)),
            "labels": ((), np.dtype(np.float32))}


def build_batch(readers: list[Reader], ids: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Fill ``out`` (preallocated, one row per id) with the samples ``ids`` ([k, 2] of
    (source, index)), in order."""
    for s in np.unique(ids[:, 0]):
        sel = np.flatnonzero(ids[:, 0] == s)
        part = readers[int(s)].take(ids[sel, 1])
        for k, dst in out.items():
            dst[sel] = part[k]
