"""Run one training job on N ranks, on loopback or inside an emulated slow network.

``run_ranks(train_args, nproc, run_dir, bandwidth="1gbit")`` starts ``python -m
zentrain.train TRAIN_ARGS`` once per rank. With a bandwidth, each rank runs in its own
network namespace of a ``zentrain.netem`` cluster whose links are shaped to that rate;
without one (``None`` / ``"none"``), the ranks talk over plain loopback. Both ways each
rank gets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) and
the same thread count, so the two are comparable. Used by ``zentrain bench e2e``, by
``zentrain run --emulate-bandwidth`` and by tests.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from zentrain.config import Config, ConfigError
from zentrain.netem import (
    ClusterRunError,
    LatencyUnavailable,
    check_available,
    parse_duration,
    parse_rate,
    run_in_cluster,
)
from zentrain.netem.launch import pump_lines, supervise


class RanksFailed(RuntimeError):
    """A rank exited non-zero or the run timed out; the message ends with its last lines."""


def parse_bandwidth(text: str | None) -> int | None:
    """"1gbit" -> bits/s; "none"/None -> None (loopback). Bad text -> ``ConfigError``."""
    try:
        return parse_rate(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_emulation(bandwidth: int | None, latency: str | None, flag: str) -> float | None:
    """Fail early, in one line, when the emulated network cannot be built here.

    Returns the latency in seconds (None for none). ``flag`` names the option that asked
    for emulation, for the message (e.g. ``--bandwidth``).
    """
    try:
        lat = parse_duration(latency)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if bandwidth is None:
        if lat is not None:
            raise ConfigError("--latency needs an emulated network (give a bandwidth too)")
        return None
    reason = check_available()
    if reason is not None:
        if flag != "--bandwidth":
            reason = reason.replace("pass --bandwidth none", f"omit {flag}")
        raise ConfigError(f"{flag} needs an emulated network, which is unavailable: {reason}")
    if lat is not None:
        from zentrain.netem import netem_available

        if not netem_available():
            raise ConfigError(f"--latency {latency}: the netem qdisc is not available in this "
                              "kernel (only rate limiting works here); omit --latency")
    return lat


def rank_threads(nproc: int) -> int:
    """Threads per rank: an even share of the cores (the ranks share this machine)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def run_ranks(train_args: Sequence[str], nproc: int, run_dir: Path, *,
              bandwidth: int | str | None = None, latency: str | float | None = None,
              module: str = "zentrain.train", timeout: float = 1800.0,
              on_output: Callable[[int, str], None] | None = None,
              env: dict[str, str] | None = None) -> None:
    """Run ``python -m MODULE *train_args`` on ``nproc`` ranks; raise ``RanksFailed``.

    ``on_output(rank, line)`` gets every output line as it arrives. The run directory is
    passed as ``ZENTRAIN_RUN_DIR`` (the trainer's fallback when no ``--run-dir`` is given).
    """
    rate = parse_rate(bandwidth) if isinstance(bandwidth, str) else bandwidth
    base_env = {"ZENTRAIN_RUN_DIR": str(run_dir), "OMP_NUM_THREADS": str(rank_threads(nproc)),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = [sys.executable, "-u", "-m", module, *train_args]
    if rate is None:
        _run_loopback(argv, nproc, base_env, timeout, on_output)
        return
    try:
        run_in_cluster(nproc, rate, lambda i, host_env: argv, timeout, latency=latency,
                       env=base_env, on_output=on_output)
    except ClusterRunError as e:
        raise RanksFailed(str(e)) from None
    except LatencyUnavailable as e:
        raise ConfigError(str(e)) from None


# -- loopback ---------------------------------------------------------------------------------

def _free_port() -> int:
    from zentrain.launch import free_port

    return free_port()


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a killed benchmark never leaves ranks behind (Linux only).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _run_loopback(argv: list[str], n: int, env: dict[str, str], timeout: float,
                  on_output: Callable[[int, str], None] | None) -> None:
    port = _free_port()
    procs: list[subprocess.Popen] = []
    outputs: list[list[str]] = [[] for _ in range(n)]
    readers: list[threading.Thread] = []
    failure = None
    try:
        for i in range(n):
            rank_env = {**os.environ, **env, "RANK": str(i), "WORLD_SIZE": str(n),
                        "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(n),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            p = subprocess.Popen(argv, env=rank_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                 errors="replace", bufsize=1,
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            procs.append(p)
            t = threading.Thread(target=pump_lines, args=(i, p, outputs[i], on_output), daemon=True)
            t.start()
            readers.append(t)
        failure = supervise(procs, timeout, "rank")
    finally:
        _stop(procs)
        for t in readers:
            t.join(timeout=5)
    if failure is not None:
        tails = [f"rank {i}: {''.join(o).strip().splitlines()[-1]}"
                 for i, o in enumerate(outputs) if "".join(o).strip()]
        raise RanksFailed(failure + ("; last lines: " + " | ".join(tails) if tails else ""))


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- zentrain run --emulate-bandwidth -----------------------------------------------------------

def run_emulated(train_args: Sequence[str], cfg: Config, run_dir: Path, bandwidth: str,
                 latency: str | None = None) -> int:
    """``zentrain run --emulate-bandwidth RATE``: the whole run, one namespace per rank.

    Checks that emulation works here (else a one-line ``ConfigError``), builds the data
    caches once, then trains. Rank 0's output is printed as is; other ranks' lines are
    prefixed with their rank. Returns the exit code (0 on success).
    """
    from zentrain.launch import prepare_data

    rate = parse_bandwidth(bandwidth)
    if rate is None:
        raise ConfigError("--emulate-bandwidth none: omit the flag to train on plain loopback")
    check_emulation(rate, latency, "--emulate-bandwidth")
    nproc = cfg.parallel.nproc
    prepare_data(cfg, nproc)
    args = list(train_args)
    if not any(a.startswith("train.threads=") for a in args):
        # Each rank is alone in its namespace (LOCAL_WORLD_SIZE=1) but shares the cores.
        args[-2:-2] = ["--set", f"train.threads={rank_threads(nproc)}"]

    def show(i: int, line: str) -> None:
        print(line if i == 0 else f"[rank {i}] {line}", flush=True)

    try:
        run_ranks(args, nproc, run_dir, bandwidth=rate, latency=latency, on_output=show,
                  timeout=float(os.environ.get("ZENTRAIN_EMULATE_TIMEOUT", 7 * 24 * 3600)))
    except RanksFailed as e:
        print(f"zentrain: {e}", file=sys.stderr)
        return 1
    return 0
