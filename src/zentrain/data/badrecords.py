"""Corrupt records and caches: what a cache remembers of them, and saying each once.

A cache (token files, a Criteo index) is built by one run and reused by later ones whose
``data.on_error`` may differ, and its key does not (and should not) include it: the
tokens of the good records are the same either way. So the build keeps the records it
skipped in the cache's ``meta.json`` (the first ``MAX_KEPT`` and how many in all), and
every open applies the current policy to them as a fresh read would: ``fail`` raises the
first one's error, ``skip`` reports them.

Reporting says each bad record once per process tree and then one summary line. ``zentrain
run`` checks the data in the launcher, then every trainer rank opens the same caches (and
again after a restart): the process that lists a cache's bad records marks it in the
environment (``REPORTED_ENV``), which the ranks it starts inherit, so they print only the
count. A new ``zentrain run`` lists them again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from zentrain.data import corpus
from zentrain.data.corpus import FAIL_HINT, BadRecord, DataError

MAX_KEPT = 1000
"""Bad records a cache keeps (and a report lists) one by one; the rest are counted."""
REPORTED_ENV = "ZENTRAIN_DATA_REPORTED"
"""Comma-separated caches whose bad records an ancestor process has listed already."""

_said: set[str] = set()  # records this process has listed
_summed: set[str] = set()  # caches this process has summarized


class SkippedRecords:
    """Collects the records a cache build skipped (a ``corpus.Skipped`` sink); with
    ``listing``, also reports each of the first ``MAX_KEPT`` as it is met, once."""

    def __init__(self, listing: bool = False) -> None:
        self.kept: list[BadRecord] = []
        self.count = 0
        self.listing = listing

    def __call__(self, rec: BadRecord) -> None:
        self.count += 1
        if len(self.kept) < MAX_KEPT:
            self.kept.append(rec)
            if self.listing:
                say_once(rec.message())

    def meta(self) -> dict[str, Any]:
        """The ``n_bad`` and ``bad`` entries of a cache's ``meta.json``."""
        return {"n_bad": self.count, "bad": [dataclasses.asdict(r) for r in self.kept]}


class ReportedLines:
    """Collects the lines a reader reports for its skipped records (``criteo_index``'s,
    which lists them as ``file:line: reason, skipped`` when it builds an index and again,
    marked ``(cached index)``, whenever it opens one), to ``announce`` them once."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.count = 0

    def __call__(self, line: str) -> None:
        if line.startswith("... and "):  # its "N more" line: the count comes from the index
            return
        self.count += 1
        if len(self.kept) < MAX_KEPT:
            self.kept.append(line.removesuffix(" (cached index)").removesuffix(", skipped"))


def say_once(message: str, report: Callable[[str], None] | None = None) -> None:
    """Report a skipped record, unless this process already did."""
    if message not in _said:
        _said.add(message)
        (report or corpus.log.warning)(message + ", skipped")


def apply_on_error(meta: dict[str, Any], key: str, what: str, on_error: str,
                   listing: bool) -> None:
    """Apply ``on_error`` to the bad records a cache's ``meta`` holds: raise the first
    one's error (``fail``), else report them (``listing``: the builder rank; the others
    stay quiet). ``key`` names the cache, ``what`` its data in the summary line."""
    n_bad = int(meta.get("n_bad", 0))
    if not n_bad:
        return
    kept = [BadRecord(**r) for r in meta.get("bad", [])]
    if on_error == "fail":
        first = kept[0].message() if kept else f"{what}: {n_bad} bad records"
        raise DataError(first + FAIL_HINT)
    if listing:
        announce(key, what, [r.message() for r in kept], n_bad)


def announce(key: str, what: str, messages: list[str], n_bad: int,
             report: Callable[[str], None] | None = None) -> None:
    """List a cache's skipped records (each once per process tree), then one line with
    their count; once per process."""
    if key in _summed or not n_bad:
        return
    _summed.add(key)
    report = report or corpus.log.warning
    inherited = key in os.environ.get(REPORTED_ENV, "").split(",")
    if not inherited:
        for m in messages:
            say_once(m, report)
    where = ("listed by the process that started this one" if inherited else
             "listed above" if len(messages) >= n_bad else
             f"the first {len(messages)} listed above")
    report(f"{what}: {n_bad} bad record{'s' if n_bad != 1 else ''} skipped "
           f"(data.on_error = 'skip'; {where})")
    if not inherited:
        marked = os.environ.get(REPORTED_ENV, "")
        os.environ[REPORTED_ENV] = f"{marked},{key}" if marked else key


def forget() -> None:
    """Forget what was reported, as a new process tree would (for tests)."""
    _said.clear()
    _summed.clear()
    os.environ.pop(REPORTED_ENV, None)
