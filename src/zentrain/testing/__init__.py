"""Helpers for testing distributed code inside pytest (also usable by users' own tests)."""

from zentrain.testing.multirank import run_ranks

__all__ = ["run_ranks"]
