"""zentrain: faster distributed PyTorch training.

Lossless sparse gradient sync (ZEN), compression, a resumable data loader and in-memory
checkpoints, on top of torch.distributed. The public entry point for your own loop is
``zentrain.DataParallel``; ``zentrain run`` trains the built-in workloads.
"""

__version__ = "0.1.0"

__all__ = ["DataParallel", "__version__"]


def __getattr__(name: str):
    # Lazy: helper processes (checkpoint agents, netem probes) import zentrain.* modules
    # without paying for `import torch` (seconds and ~300 MB each).
    if name == "DataParallel":
        from zentrain.api import DataParallel

        return DataParallel
    raise AttributeError(f"module 'zentrain' has no attribute {name!r}")
