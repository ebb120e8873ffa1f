"""Self-check: ``python -m zentrain.netem [--rate 1gbit] [--mbytes 16] [--allreduce-mb 64]``.

Builds a cluster, measures the link between hosts 0 and 1 in both directions and, with
``--allreduce-mb``, times a gloo all_reduce of that many MB of fp32 across all hosts. With
``--sweep`` it only removes clusters left by killed runs.
"""

from __future__ import annotations

import argparse
import sys

from zentrain.netem.cluster import EmulatedCluster
from zentrain.netem.launch import run_in_cluster
from zentrain.netem.measure import measure_throughput
from zentrain.netem.system import check_available, sweep_stale
from zentrain.netem.units import format_rate, parse_rate

# One warm-up, then the median of --repeats timed all_reduce calls, printed by rank 0.
_ALLREDUCE = """
import datetime, statistics, sys, time, torch, torch.distributed as dist
mb, repeats = float(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
t = torch.ones(int(mb * 2**20) // 4)
times = []
for _ in range(repeats + 1):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(f"all_reduce {mb:g} MB fp32: median {statistics.median(times[1:]) * 1e3:.0f} ms "
          f"(min {min(times[1:]) * 1e3:.0f}) over {repeats}", flush=True)
dist.destroy_process_group()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zentrain.netem", description=__doc__)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="per-direction link rate, or 'none'")
    ap.add_argument("--mbytes", type=float, default=16, help="MB per throughput probe")
    ap.add_argument("--allreduce-mb", type=float, default=0, help="also time an all_reduce")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="only remove stale clusters")
    args = ap.parse_args(argv)
    try:
        rate = parse_rate(args.rate)
    except ValueError as exc:
        ap.error(str(exc))
    reason = check_available()
    if reason is not None:
        print(f"unavailable: {reason}", file=sys.stderr)
        return 2
    if args.sweep:
        print("removed:", " ".join(sweep_stale()) or "nothing")
        return 0
    nbytes = int(args.mbytes * 2**20)
    with EmulatedCluster(args.hosts, rate) as cluster:
        for src, dst in ((0, 1), (1, 0)):
            bps = measure_throughput(cluster, src, dst, nbytes)
            print(f"host {src} -> host {dst}: {format_rate(bps)} goodput "
                  f"(configured {format_rate(rate)}, {bps / rate:.0%})" if rate else
                  f"host {src} -> host {dst}: {format_rate(bps)} goodput (unshaped)")
    if args.allreduce_mb:
        run_in_cluster(args.hosts, rate, timeout=600, on_output=lambda i, line: print(line),
                       argv_for_host=lambda i, env: [sys.executable, "-c", _ALLREDUCE,
                                                     str(args.allreduce_mb), str(args.repeats)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
