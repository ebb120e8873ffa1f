"""``zentrain bench <name>``: benchmarks that compare systems side by side in one run.

Each benchmark lives in its own module here and exposes ``register(subparsers)``, which adds
its subcommand and sets ``func`` to a callable taking the parsed args and returning an exit
code. Modules are listed in ``BENCHES``; a benchmark's module is imported only to register it.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("sync", "e2e", "compress", "data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (sync, e2e, compress, data)",
                       description="Benchmarks: every system measured side by side in one run.")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        try:
            mod = importlib.import_module(f"zentrain.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"zentrain.bench.{name}":
                raise
            continue
        mod.register(bsub)
