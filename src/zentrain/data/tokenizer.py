"""Byte-level BPE tokenizer (HF ``tokenizers``), trained on first use and cached on disk.

The cache lives in ``data.cache_dir/<key>/`` where ``key`` hashes everything that decides
the result: the corpus file list with sizes and mtimes, the vocabulary size, ``max_bytes``,
and the ``tokenizers`` version. Edit a file, and the next run retrains.

Cache safety, because several ranks and killed runs share the directory:

* every file is written to a private temporary name and ``os.replace``-d into place, so a
  reader sees either nothing or a complete file, never a torn one;
* builders take an exclusive ``flock`` on ``<key>/.lock``, so two runs that start at once
  build once (the second waits, then finds the cache complete); the OS drops the lock of a
  killed process;
* only the builder (local rank 0 in a distributed run) ever writes; other ranks wait at a
  barrier and then only open. See ``zentrain.data.text.prepare_text_data``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from zentrain.data.corpus import Document

EOT = "<|endoftext|>"
"""End-of-text special token, placed after every document in the token stream."""
CACHE_FORMAT = 2
"""Bump when the cache layout changes, so old caches are not misread (2: ``meta.json``
keeps the skipped bad records, see ``badrecords.py``)."""
TOKENIZER_FILE = "tokenizer.json"


def cache_key(files: list[Path], vocab_size: int, max_bytes: int) -> str:
    """A short hash of everything that determines the tokenizer and the token stream."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, tokenizers.__version__, vocab_size, max_bytes]).encode())
    for p in files:
        st = p.stat()
        h.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr counting input bytes (disabled: draws nothing)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


# --- atomic cache writes --------------------------------------------------------------------

def tmp_path(path: Path) -> Path:
    """A private temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """Hold the cache directory's exclusive build lock; sweep temporaries of dead builders.

    Under the lock no other builder is writing, so every ``.*.tmp-*`` file left is debris
    from a killed run.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:  # "a": never truncate (or touch) it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in cache.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- training ---------------------------------------------------------------------------------

def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: every byte is a symbol, so no input is ever unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(docs: Iterator[Document], vocab_size: int, total_bytes: int,
                    progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (``EOT`` included) on ``docs``.

    The real vocabulary can come out smaller on a small corpus (no more pairs to merge):
    read ``get_vocab_size()``.
    """
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)  # its own bar writes raw to stderr; ours is rich
    with progress_bar(progress) as bar:
        task = bar.add_task(f"training BPE tokenizer ({vocab_size} tokens)", total=total_bytes)

        def texts() -> Iterator[str]:
            for doc in docs:
                bar.advance(task, doc.nbytes)
                yield doc.text
            bar.update(task, description="computing BPE merges")

        tok.train_from_iterator(texts(), trainer=trainer)
        bar.update(task, completed=total_bytes, description="trained BPE tokenizer")
    return tok


def load_or_train_tokenizer(cache: Path, docs: Iterator[Document], vocab_size: int,
                            total_bytes: int, progress: bool = True) -> Tokenizer:
    """The tokenizer cached in ``cache``, trained on ``docs`` and saved first if absent.

    Call with the build lock held (``build_lock``); ``docs`` is only consumed on a miss.
    """
    path = cache / TOKENIZER_FILE
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer(docs, vocab_size, total_bytes, progress)
    atomic_write_text(path, tok.to_str())
    return tok


def open_tokenizer(cache: Path) -> Tokenizer:
    """Load the tokenizer a builder left in ``cache``."""
    return Tokenizer.from_file(str(cache / TOKENIZER_FILE))
