"""zentrain: faster distributed PyTorch training.

Lossless sparse gradient sync (ZEN), compression, a resumable data loader and in-memory
checkpoints, on top of torch.distributed. The public entry point for your own loop is
``zentrain.DataParallel``; ``zentrain run`` trains the built-in workloads.
"""

__version__ = "0.1.0"

from zentrain.api import DataParallel  # noqa: E402

__all__ = ["DataParallel", "__version__"]
