"""Start N local workers through torch's elastic launcher (the API behind ``torchrun``).

``zentrain run`` on one machine: pick a free port (or check the one given), prepare data
caches once in this process (so workers never wait on a tokenizer build inside a collective
timeout, and bad data paths fail before any worker starts), then launch
``python -m zentrain.train`` on ``nproc`` ranks with a c10d rendezvous on localhost.
Already inside torchrun (RANK and WORLD_SIZE set), it trains in place instead, so the
multi-node path is plain ``torchrun ... -m zentrain.train CONFIG``.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

from zentrain.config import Config, ConfigError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"bad --port {port} (allowed: 1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"port {port} is in use (pick another --port, or omit it for a "
                              "free one)") from None


def inside_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def prepare_data(cfg: Config, nproc: int) -> None:
    """Build tokenizer/token caches once and validate the data for ``nproc`` ranks."""
    from zentrain.data import build_loader

    build_loader(cfg, 0, nproc, is_builder=True)


def launch_local(train_args: list[str], nproc: int, run_dir: Path, port: int | None = None,
                 max_restarts: int = 0, env: dict[str, str] | None = None,
                 worker_args: list[str] | None = None) -> int:
    """Run ``python -m zentrain.train *train_args`` on ``nproc`` local ranks; exit code.

    ``worker_args`` replaces the interpreter arguments that start a worker (e.g. the
    ``zentrain.zygote`` stub, which forks workers from a preloaded process)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if port is None:
        port = free_port()
    else:
        check_port(port)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.update({
        "ZENTRAIN_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        # Restarted workers otherwise read stale rendezvous entries (PyTorch #135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
    })
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                      run_id=f"zentrain-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                      rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"timeout": 120},
                      max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(lc, sys.executable)(
            *(worker_args or ["-u", "-m", "zentrain.train", *train_args]))
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        first = min(codes)
        print(f"zentrain: worker rank {first} failed with exit code {codes[first]} "
              "(its message is above)", file=sys.stderr)
        return codes[first] if codes[first] > 0 else 1
    return 0
