"""An emulated slow-network cluster on one Linux machine, for measuring gradient-sync speedups.

Each host is a network namespace joined to a software switch by a veth pair whose two
directions are rate-limited with ``tc tbf``, so N processes on one machine talk to each other
as N machines on a 1gbit (or any) network would. Needs root and iproute2; see docs/netem.md.

    from zentrain.netem import EmulatedCluster, check_available, measure_throughput

    if (reason := check_available()) is None:
        with EmulatedCluster(2, rate="1gbit") as cluster:
            print(measure_throughput(cluster, 0, 1, 16 << 20) / 1e6, "Mbit/s")
            proc = cluster.popen(1, ["python", "worker.py"])  # env_for(1) is set for it
            proc.wait()
"""

from zentrain.netem.cluster import EmulatedCluster
from zentrain.netem.launch import ClusterRunError, HostResult, run_in_cluster
from zentrain.netem.measure import measure_throughput
from zentrain.netem.system import (
    LatencyUnavailable,
    NetemError,
    NetemUnavailable,
    check_available,
    netem_available,
    require_available,
    sweep_stale,
)
from zentrain.netem.units import format_rate, parse_duration, parse_rate

__all__ = [
    "ClusterRunError",
    "EmulatedCluster",
    "HostResult",
    "LatencyUnavailable",
    "NetemError",
    "NetemUnavailable",
    "check_available",
    "format_rate",
    "measure_throughput",
    "netem_available",
    "parse_duration",
    "parse_rate",
    "require_available",
    "run_in_cluster",
    "sweep_stale",
]
