"""Text corpora for the GPT: which files, and the documents inside them.

The default corpus is the ``.py`` files of the running interpreter's standard library
(~1,800 files, ~31 MB on Python 3.11): always present, no download, and real text. Some of
those files are deliberately not valid UTF-8 (codec tests), so every file is decoded with
``errors="replace"`` rather than trusted.

User corpora: ``.jsonl`` files hold one JSON object per line with a ``"text"`` field; any
other file (``.txt``, ``.md``, ...) is one document. Globs are expanded, directories are
walked. A corrupt JSONL line is reported with ``file:line`` and skipped or fatal per
``data.on_error``.

Memory stays bounded whatever the file size: JSONL is read a line at a time, and a text
file in pieces of about ``READ_CHUNK_BYTES``. A piece ends where the GPT's byte-level
pre-tokenizer splits anyway (between printable ASCII and ASCII whitespace), so the pieces
of a document tokenize to exactly the tokens of the whole (``Document.end`` says where the
document, and its end-of-text token, really ends). Only a stretch of a chunk's length
without any such place is cut elsewhere, where a token may then differ.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zentrain.config import DataConfig

log = logging.getLogger("zentrain.data")

READ_CHUNK_BYTES = 4 << 20
"""A text file is read in pieces of about this size (a document larger than this becomes
several ``Document`` pieces)."""
FAIL_HINT = "; set data.on_error='skip' to skip such records"
"""Appended to the error of a bad record under ``data.on_error = "fail"``."""


class DataError(ValueError):
    """A data problem the user must fix (missing path, empty corpus, corrupt record...)."""


@dataclass(frozen=True)
class Document:
    """One document, or a piece of one, and how many bytes of input it took (for progress
    and ``max_bytes``)."""

    text: str
    nbytes: int
    end: bool = True
    """The document ends here (False: a piece of a large text file; more follows)."""


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read: where it is and why."""

    file: str
    line: int
    """1-based line (``unit = "line"``) or row (``"row"``); 0: the whole file."""
    reason: str
    """E.g. ``bad JSONL record (Expecting value: ...)``."""
    unit: str = "line"

    def message(self) -> str:
        """``file:line: reason`` (``file: row N: reason`` for parquet rows)."""
        if self.line == 0:
            return f"{self.file}: {self.reason}"
        if self.unit == "row":
            return f"{self.file}: row {self.line}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


Skipped = Callable[[BadRecord], None]
"""Receives each record a reader skipped (e.g. to keep them in a cache's metadata)."""


def bad_record(rec: BadRecord, on_error: str, report: Callable[[str], None] | None,
               skipped: Skipped | None = None) -> None:
    """Apply ``data.on_error`` to a bad record: raise, or pass it on and go on."""
    if on_error == "fail":
        raise DataError(rec.message() + FAIL_HINT)
    if skipped is not None:
        skipped(rec)
    if report is not None:
        report(rec.message() + ", skipped")


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place: site-packages can hold far more files than the stdlib itself.
        dirnames[:] = [d for d in dirnames if d not in skip]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def expand_path(spec: str) -> list[Path]:
    """The files a path, glob or directory names (sorted); ``DataError`` if none."""
    path = Path(spec).expanduser()
    if glob.has_magic(str(path)):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
    elif path.exists():
        matches = [path]
    else:
        matches = []
    out: list[Path] = []
    for m in matches:
        if m.is_dir():
            out.extend(sorted(p for p in m.rglob("*") if p.is_file()))
        elif m.is_file():
            out.append(m)
    if not out:
        raise DataError(f"data path not found: {spec}")
    return out


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The files of the corpus named by ``cfg.paths`` (the stdlib when empty), in a fixed
    order, each once."""
    if not cfg.paths:
        files = stdlib_files()
        if not files:
            raise DataError(f"no .py files found in the standard library at "
                            f"{sysconfig.get_paths()['stdlib']}; set data.paths")
        return files
    return expand_paths(cfg.paths)


def expand_paths(specs: list[str]) -> list[Path]:
    """The files of several paths/globs/directories, in order, each once."""
    seen: dict[Path, None] = {}
    for spec in specs:
        for p in expand_path(spec):
            seen.setdefault(p.resolve(), None)
    return list(seen)


# --- reading files ------------------------------------------------------------------------------

class Budget:
    """Input bytes left under ``data.max_bytes`` (``left`` None: no limit)."""

    def __init__(self, max_bytes: int = 0) -> None:
        self.left: int | None = max_bytes if max_bytes > 0 else None

    @property
    def spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self, n: int) -> None:
        if self.left is not None:
            self.left -= n


def file_documents(path: Path, jsonl: bool, budget: Budget, on_error: str = "skip",
                   report: Callable[[str], None] | None = log.warning,
                   skipped: Skipped | None = None,
                   chunk: int = READ_CHUNK_BYTES) -> Iterator[Document]:
    """The documents of one file: one per JSONL record (``jsonl``), else the whole file as
    one document, in pieces of about ``chunk`` bytes. Charges what it reads to ``budget``
    (a JSONL record cut by the budget is dropped, not reported)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as e:
        bad_record(BadRecord(str(path), 0, f"cannot read ({e.strerror or e})"), on_error,
                   report, skipped)
        return
    with f:
        if jsonl:
            yield from _jsonl_file(path, f, budget, on_error, report, skipped)
        else:
            yield from _text_file(f, budget, chunk)


def _jsonl_file(path: Path, f: BinaryIO, budget: Budget, on_error: str,
                report: Callable[[str], None] | None,
                skipped: Skipped | None) -> Iterator[Document]:
    limit, used = budget.left, 0
    # Binary lines end at b"\n" only: JSON strings may hold U+2028 and friends unescaped.
    for lineno, raw in enumerate(f, start=1):
        if limit is not None and used + len(raw) > limit:
            break  # keep whole records only
        used += len(raw)
        line = raw.decode("utf-8", errors="replace").removesuffix("\n")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError('expected an object with a string "text" field')
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            bad_record(BadRecord(str(path), lineno,
                                 f"bad JSONL record ({str(e).splitlines()[0]})"),
                       on_error, report, skipped)
            continue
        yield Document(obj["text"], len(line.encode("utf-8", errors="replace")) + 1)
    budget.take(used)


_CUT = re.compile(rb"[\x21-\x7e][\t\n\v\f\r ]")
"""Printable ASCII followed by ASCII whitespace: the byte-level BPE's pre-tokenizer always
splits between the two (no pre-token runs from a non-space into a space), so cutting a
text there tokenizes exactly as the whole. Both bytes are ASCII, so UTF-8 decoding of the
two sides is unchanged too."""


def cut_point(buf: bytes) -> int:
    """Where to end a piece of ``buf``: just after the printable byte of its last ``_CUT``
    match (0 < cut < len(buf); 0: no such place)."""
    hi = len(buf)
    while hi > 1:
        lo = max(0, hi - (64 << 10))  # look at the tail first: a match is usually near
        last = None
        for last in _CUT.finditer(buf, lo, hi):  # noqa: B007 - the last match is wanted
            pass
        if last is not None:
            return last.start() + 1
        hi = lo + 1  # a match may straddle ``lo``
    return 0


def _char_boundary(buf: bytes) -> int:
    """A place near the end of ``buf`` that does not split a UTF-8 character."""
    for at in range(len(buf) - 1, max(0, len(buf) - 4), -1):
        if not 0x80 <= buf[at] < 0xC0:  # not a continuation byte: a character starts here
            return at
    return len(buf) - 1


def _text_file(f: BinaryIO, budget: Budget, chunk: int) -> Iterator[Document]:
    pending = b""
    while True:
        want = chunk if budget.left is None else min(chunk, budget.left)
        data = f.read(want) if want > 0 else b""
        budget.take(len(data))
        buf = pending + data
        if not data:  # end of file, or of the budget (cut anywhere, as max_bytes says)
            if buf:
                yield Document(buf.decode("utf-8", errors="replace"), len(buf))
            return
        if len(buf) < chunk:
            pending = buf
            continue
        at = cut_point(buf) or _char_boundary(buf)
        yield Document(buf[:at].decode("utf-8", errors="replace"), at, end=False)
        pending = buf[at:]


def iter_documents(files: list[Path], max_bytes: int = 0, on_error: str = "skip",
                   report: Callable[[str], None] | None = log.warning,
                   skipped: Skipped | None = None,
                   chunk: int = READ_CHUNK_BYTES) -> Iterator[Document]:
    """Yield the documents of ``files`` in order (``.jsonl`` by record, any other file
    whole, in pieces of about ``chunk`` bytes), stopping after ``max_bytes`` bytes of input
    (0: no limit; the last document is cut). ``report`` receives one line per skipped
    record (None: silent, e.g. on a second pass over the same files), ``skipped`` the
    record itself."""
    budget = Budget(max_bytes)
    for path in files:
        if budget.spent:
            return
        yield from file_documents(path, path.suffix == ".jsonl", budget, on_error, report,
                                  skipped, chunk)


def files_within(files: list[Path], max_bytes: int = 0) -> list[Path]:
    """The leading files ``iter_documents`` reads before ``max_bytes`` runs out (0: all)."""
    if max_bytes <= 0:
        return files
    used = 0
    for i, p in enumerate(files):
        used += p.stat().st_size
        if used >= max_bytes:
            return files[:i + 1]
    return files


def total_bytes(files: list[Path], max_bytes: int = 0) -> int:
    """Input bytes ``iter_documents`` will read (for progress bars)."""
    total = sum(p.stat().st_size for p in files)
    return min(total, max_bytes) if max_bytes > 0 else total
