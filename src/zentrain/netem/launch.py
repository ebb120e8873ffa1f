"""Start one process per emulated host (one torch.distributed rank each) and supervise them."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from zentrain.netem.cluster import EmulatedCluster

DEFAULT_MASTER_PORT = 29500  # each cluster has its own namespaces, so no port can clash


@dataclass
class HostResult:
    """How one host's process ended: ``returncode`` is None if it had to be killed."""

    host: int
    returncode: int | None
    output: str  # stdout and stderr, interleaved as written


class ClusterRunError(RuntimeError):
    """A host failed or the run timed out; ``results`` holds every host's output so far."""

    def __init__(self, message: str, results: list[HostResult]) -> None:
        super().__init__(message)
        self.results = results


def run_in_cluster(n: int, rate: str | int | None,
                   argv_for_host: Callable[[int, dict[str, str]], Sequence[str]],
                   timeout: float, *, latency: str | float | None = None,
                   env: Mapping[str, str] | None = None,
                   master_port: int = DEFAULT_MASTER_PORT,
                   on_output: Callable[[int, str], None] | None = None,
                   cwd: str | None = None, grace: float = 5.0) -> list[HostResult]:
    """Run one process per host of a fresh ``EmulatedCluster(n, rate, latency)``.

    ``argv_for_host(i, host_env)`` returns host i's command. ``host_env`` holds what a
    torch.distributed rank needs — ``RANK=i``, ``WORLD_SIZE=n``, ``LOCAL_RANK=0``,
    ``LOCAL_WORLD_SIZE=1``, ``MASTER_ADDR`` (host 0), ``MASTER_PORT``,
    ``GLOO_SOCKET_IFNAME`` — plus ``env``, ``PYTHONUNBUFFERED=1`` and an even share of the
    cores in ``OMP_NUM_THREADS`` unless set; the callback may add to it. Each output line is
    passed to ``on_output(i, line)`` as it arrives and kept in the results.

    When any process exits non-zero, or ``timeout`` seconds pass, the others get SIGTERM, then
    SIGKILL after ``grace`` seconds, and :class:`ClusterRunError` is raised. The cluster is
    always removed. Returns the per-host results in host order.
    """
    threads = str(max(1, (os.cpu_count() or 1) // n))
    with EmulatedCluster(n, rate, latency) as cluster:
        procs: list[subprocess.Popen] = []
        outputs: list[list[str]] = [[] for _ in range(n)]
        readers: list[threading.Thread] = []
        failure, stopped = None, set()
        try:
            for i in range(n):
                host_env = {**cluster.env_for(i), "RANK": str(i), "WORLD_SIZE": str(n),
                            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                            "MASTER_PORT": str(master_port), "PYTHONUNBUFFERED": "1"}
                if "OMP_NUM_THREADS" not in os.environ:
                    host_env["OMP_NUM_THREADS"] = threads
                host_env.update(env or {})
                argv = list(argv_for_host(i, host_env))
                proc = cluster.popen(i, argv, env=host_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, errors="replace", bufsize=1, cwd=cwd)
                procs.append(proc)
                reader = threading.Thread(target=pump_lines, args=(i, proc, outputs[i], on_output),
                                          daemon=True)
                reader.start()
                readers.append(reader)
            failure = supervise(procs, timeout)
        finally:
            stopped = _stop(procs, grace)
            for reader in readers:
                reader.join(timeout=grace)
    results = [HostResult(i, None if i in stopped else p.returncode, "".join(outputs[i]))
               for i, p in enumerate(procs)]
    if failure is not None:
        raise ClusterRunError(failure + _last_lines(results), results)
    return results


def pump_lines(i: int, proc: subprocess.Popen, sink: list[str],
               on_output: Callable[[int, str], None] | None) -> None:
    """Collect process ``i``'s output lines into ``sink``, passing each to ``on_output``."""
    for line in proc.stdout:
        sink.append(line)
        if on_output is not None:
            try:
                on_output(i, line.rstrip("\n"))
            except Exception:  # noqa: BLE001 - a broken printer must not hang the run
                on_output = None
    proc.stdout.close()


def supervise(procs: list[subprocess.Popen], timeout: float, what: str = "host"
              ) -> str | None:
    """Wait for all; the failure message (naming the first ``what`` that failed), or None
    when every process exited 0."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            return f"{what} {bad[0]} exited with code {codes[bad[0]]}"
        if all(c == 0 for c in codes):
            return None
        if time.monotonic() > deadline:
            running = [i for i, c in enumerate(codes) if c is None]
            return f"timed out after {timeout:g}s with {what}s {running} still running"
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace: float) -> set[int]:
    """SIGTERM what still runs, SIGKILL it after ``grace``; the indices that were stopped."""
    stopped = {i for i, p in enumerate(procs) if p.poll() is None}
    for i in stopped:
        procs[i].terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return stopped


def _last_lines(results: list[HostResult]) -> str:
    tails = [f"host {r.host}: {r.output.strip().splitlines()[-1]}"
             for r in results if r.output.strip()]
    return ("; last lines: " + " | ".join(tails)) if tails else ""
