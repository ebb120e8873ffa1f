"""Text corpora for the GPT: which files, and the documents inside them.

The default corpus is the ``.py`` files of the running interpreter's standard library
(~1,800 files, ~31 MB on Python 3.11): always present, no download, and real text. Some of
those files are deliberately not valid UTF-8 (codec tests), so every file is decoded with
``errors="replace"`` rather than trusted.

User corpora: ``.jsonl`` files hold one JSON object per line with a ``"text"`` field; any
other file (``.txt``, ``.md``, ...) is one document. Globs are expanded, directories are
walked. A corrupt JSONL line is reported with ``file:line`` and skipped or fatal per
``data.on_error``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from zentrain.config import DataConfig

log = logging.getLogger("zentrain.data")


class DataError(ValueError):
    """A data problem the user must fix (missing path, empty corpus, corrupt record...)."""


@dataclass(frozen=True)
class Document:
    """One document and how many bytes of input it took (for progress and ``max_bytes``)."""

    text: str
    nbytes: int


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


def _jsonl_docs(path: Path, raw: str, on_error: str,
                report: Callable[[str], None] | None) -> Iterator[Document]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        nbytes = len(line.encode("utf-8", errors="replace")) + 1
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError('expected an object with a string "text" field')
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            msg = f"{path}:{lineno}: bad JSONL record ({str(e).splitlines()[0]})"
            if on_error == "fail":
                raise DataError(msg + "; set data.on_error='skip' to skip such lines") from None
            if report is not None:
                report(msg + ", skipped")
            continue
        yield Document(obj["text"], nbytes)


def iter_documents(files: list[Path], max_bytes: int = 0, on_error: str = "skip",
                   report: Callable[[str], None] | None = log.warning) -> Iterator[Document]:
    """Yield the documents of ``files`` in order, stopping after ``max_bytes`` bytes of input
    (0: no limit; the last document is cut). ``report`` receives one line per skipped
    record (None: silent, e.g. on a second pass over the same files)."""
    budget = max_bytes if max_bytes > 0 else None
    for path in files:
        if budget is not None and budget <= 0:
            return
        try:
            data = path.read_bytes()
        except OSError as e:
            msg = f"{path}: cannot read ({e.strerror or e})"
            if on_error == "fail":
                raise DataError(msg) from None
            if report is not None:
                report(msg + ", skipped")
            continue
        if budget is not None and len(data) > budget:
            data = data[:budget]
            if path.suffix == ".jsonl":  # keep whole records only
                data = data[:data.rfind(b"\n") + 1]
        text = data.decode("utf-8", errors="replace")
        if path.suffix == ".jsonl":
            docs: Iterator[Document] = _jsonl_docs(path, text, on_error, report)
        else:
            docs = iter([Document(text, len(data))] if text else [])
        yield from docs
        if budget is not None:
            budget -= len(data)


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
