"""Start N local workers through torch's elastic launcher (the API behind ``torchrun``).

``zentrain run`` on one machine: pick a free port (or check the one given), prepare data
caches once in this process (so workers never wait on a tokenizer build inside a collective
timeout, and bad data paths fail before any worker starts), then launch
``python -m zentrain.train`` on ``nproc`` ranks with a c10d rendezvous on localhost.
Already inside torchrun (RANK and WORLD_SIZE set), it trains in place instead, so the
multi-node path is plain ``torchrun ... -m zentrain.train CONFIG``.

Errors a restart cannot fix (exit code 2: config or data, 3: non-finite loss) end the job
at once: ``no_restart_on_fatal`` stops torch's elastic agent from restarting on them, and
the worker leaves ``RUN_DIR/fatal.json`` so that restarted workers under plain torchrun
(``--max-restarts``) exit at once too. Device layouts NCCL cannot run are refused before
any process starts (``check_device_layout``, also called by each worker).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zentrain.config import Config, ConfigError

FATAL_EXIT_CODES = (2, 3)
"""Worker exit codes that a restart cannot fix: 2 bad config or data, 3 non-finite loss."""

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` that makes cuBLAS deterministic (CUDA docs, "Reproducibility")."""


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


def resolve_device_type(cfg: Config) -> str:
    """``cuda`` or ``cpu`` from ``train.device``, without touching any GPU."""
    import torch

    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available (allowed here: "
                              "'cpu' or 'auto')")
        return "cuda"
    return "cpu"


def resolve_backend(cfg: Config, device_type: str) -> str:
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError("parallel.backend = 'nccl' needs CUDA tensors (allowed on CPU: 'gloo')")
    return backend


def check_device_layout(cfg: Config, local_world: int, world: int) -> tuple[str, str]:
    """Refuse layouts NCCL cannot run, before any process group exists (the launcher calls
    it before starting workers, each worker before ``init_process_group``). Returns the
    device type and backend."""
    import torch

    device_type = resolve_device_type(cfg)
    backend = resolve_backend(cfg, device_type)
    if world > 1 and backend == "nccl":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            # Two NCCL ranks on one GPU fail deep inside the first collective (or hang).
            raise ConfigError(f"--nproc {local_world} but {gpus} GPU(s): NCCL needs one GPU "
                              f"per rank; use --nproc {gpus} or train.device=cpu")
        if cfg.sync.scheme == "ddp" and cfg.model.sparse_embedding:
            raise ConfigError("sync.scheme = 'ddp' with model.sparse_embedding = true needs "
                              "gloo: NCCL has no sparse all-reduce (use another sync.scheme, "
                              "e.g. 'zen', or model.sparse_embedding = false)")
    return device_type, backend


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def maybe_warn_oversubscribed(local_world: int, device_type: str,
                              cores: int | None = None) -> bool:
    """One line on stderr when more CPU ranks than cores share this machine."""
    cores = cpu_cores() if cores is None else cores
    if device_type != "cpu" or local_world <= cores:
        return False
    print(f"[zentrain] warning: {local_world} ranks on {cores} CPU core(s): the ranks share "
          f"cores, so each step is slower than with --nproc {cores}", file=sys.stderr,
          flush=True)
    return True


def maybe_set_cublas_workspace(cfg: Config, env: dict[str, str] | os._Environ[str] = os.environ
                               ) -> None:
    """Deterministic cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first call, or
    ``torch.use_deterministic_algorithms`` raises at the first matmul on CUDA."""
    if cfg.train.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in env:
        env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


FATAL_FILE = "fatal.json"
"""Written into the run dir when a worker stops with a fatal error (exit code 2 or 3)."""


def _job_id(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    job = env.get("TORCHELASTIC_RUN_ID", "")
    return job if job and job != "none" else None  # "none": torchrun without a run id


def record_fatal(run_dir: Path, code: int, message: str) -> None:
    """Leave a note for this job's restarted workers (torchrun --max-restarts, emulated
    nodes): the error will not go away, so they exit at once instead of training again."""
    job = _job_id()
    if job is None:
        return
    try:
        tmp = run_dir / f".{FATAL_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"job": job, "code": code, "error": message}))
        tmp.rename(run_dir / FATAL_FILE)
    except OSError:
        pass  # best effort: without it a restart fails the same way again


def fatal_before(run_dir: Path) -> int | None:
    """The exit code of this job's fatal error, if a worker hit one before this restart."""
    job = _job_id()
    if job is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0) == 0:
        return None
    try:
        rec = json.loads((run_dir / FATAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return int(rec["code"]) if isinstance(rec, dict) and rec.get("job") == job else None


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
        with no_restart_on_fatal():
            elastic_launch(lc, sys.executable)(
                *(worker_args or ["-u", "-m", "zentrain.train", *train_args]))
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        fatal = [c for c in codes.values() if c in FATAL_EXIT_CODES]
        if fatal:  # the worker printed the message ("zentrain: error: ...")
            return fatal[0]
        first = min(codes)
        print(f"zentrain: worker rank {first} failed with exit code {codes[first]} "
              "(its message is above)", file=sys.stderr)
        return codes[first] if codes[first] > 0 else 1
    return 0


class _QuietFatal(logging.Filter):
    """Drops torch's "failed (exitcode: N)" line for fatal codes: the worker's own
    one-line message already says what went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("failed (exitcode")
                    and record.args and record.args[0] in FATAL_EXIT_CODES)


@contextmanager
def no_restart_on_fatal() -> Iterator[None]:
    """While inside, ``elastic_launch`` stops the job at once when a worker exits with a
    code in ``FATAL_EXIT_CODES`` instead of spending ``max_restarts`` rounds on an error
    that fails the same way every time. Other failures (a crash, a signal) are restarted
    as before.

    torch's launcher has no hook for this: ``launch_agent`` instantiates
    ``LocalElasticAgent`` by its module-level name, so it is swapped for a subclass that
    clears the remaining restarts when it sees a fatal exit code (this process only)."""
    import torch.distributed.launcher.api as api

    base = api.LocalElasticAgent

    class _Agent(base):  # type: ignore[misc, valid-type]
        def _monitor_workers(self, worker_group):  # type: ignore[no-untyped-def]
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and any(f.exitcode in FATAL_EXIT_CODES
                                          for f in result.failures.values()):
                self._remaining_restarts = 0
            return result

    log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    quiet = _QuietFatal()
    api.LocalElasticAgent = _Agent
    log.addFilter(quiet)
    try:
        yield
    finally:
        api.LocalElasticAgent = base
        log.removeFilter(quiet)
