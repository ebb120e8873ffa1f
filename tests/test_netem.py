"""The emulated slow-network cluster: shaping, torch.distributed over it, and cleanup.

Tests that build namespaces need root and iproute2; elsewhere they are skipped with the
reason ``check_available()`` gives. Every such test also asserts nothing of ours is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import zentrain.netem as netem_module
from zentrain.netem import (
    ClusterRunError,
    EmulatedCluster,
    LatencyUnavailable,
    check_available,
    format_rate,
    measure_throughput,
    netem_available,
    parse_duration,
    parse_rate,
    run_in_cluster,
    sweep_stale,
)
from zentrain.netem.system import ETC_NETNS, NS_PATTERN, list_namespaces

_REASON = check_available()
needs_netem = pytest.mark.skipif(_REASON is not None, reason=f"no network emulation: {_REASON}")


def _ours(run_id: str | None = None) -> list[str]:
    """Our namespaces (all, or one cluster's), zt* links in the root namespace, /etc/netns dirs."""
    found = [n for n in list_namespaces()
             if (m := NS_PATTERN.match(n)) and (run_id is None or m.group(1) == run_id)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += re.findall(r"^\d+: (zt[0-9a-f]{6}\w*)", links, flags=re.MULTILINE)
    etc = ETC_NETNS.iterdir() if ETC_NETNS.is_dir() else []
    found += [f"/etc/netns/{p.name}" for p in etc if NS_PATTERN.match(p.name)
              and (run_id is None or p.name.startswith(f"zt{run_id}-"))]
    return found


def list_namespaces_of(run_id: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"zt{run_id}-")]


@pytest.fixture
def clean():
    """Fails the test if it leaves one of our namespaces or links behind."""
    before = set(_ours())
    yield
    left = set(_ours()) - before
    assert not left, f"left behind: {sorted(left)}"


# -- units: no root needed ------------------------------------------------------------------
@pytest.mark.parametrize("text, bits", [("1gbit", 10**9), ("100Mbit", 10**8), ("2.5gbit", 25 * 10**8),
                                        ("1gbit/s", 10**9), ("64kbit", 64_000), ("none", None),
                                        ("", None), (None, None)])
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits
    assert parse_rate(format_rate(bits)) == bits


@pytest.mark.parametrize("text", ["fast", "1gbps", "1gb", "10", "-1gbit", "0mbit", "1e9tbit",
                                  "1 xbit", "1.2.3gbit"])
def test_parse_rate_errors_name_value_and_allowed_units(text):
    with pytest.raises(ValueError) as info:
        parse_rate(text)
    message = str(info.value)
    assert repr(text) in message and "gbit" in message and "\n" not in message


def test_parse_duration():
    assert parse_duration("0.2ms") == pytest.approx(2e-4)
    assert parse_duration("200us") == pytest.approx(2e-4)
    assert parse_duration("none") is None and parse_duration("0") is None
    with pytest.raises(ValueError, match="'1h'"):
        parse_duration("1h")


def test_cluster_arguments_are_validated_before_touching_the_system():
    with pytest.raises(ValueError, match="n_hosts"):
        EmulatedCluster(0)
    with pytest.raises(ValueError, match="'1gbps'"):
        EmulatedCluster(2, rate="1gbps")


def test_check_available_reason_says_how_to_run_without_emulation():
    if _REASON is not None:
        assert "--bandwidth none" in _REASON and "\n" not in _REASON


# -- real namespaces --------------------------------------------------------------------------
@needs_netem
def test_latency_without_netem_is_a_clear_error(clean):
    if netem_available():
        pytest.skip("this kernel has netem, so latency works")
    with pytest.raises(LatencyUnavailable) as info:
        EmulatedCluster(2, rate="1gbit", latency="0.2ms").open()
    message = str(info.value)
    assert "netem" in message and "only rate limiting" in message and "\n" not in message


@needs_netem
def test_shaped_link_carries_its_configured_rate(clean):
    rate = parse_rate("200mbit")
    with EmulatedCluster(3, rate="200mbit") as cluster:
        assert {cluster.addr(i) for i in range(3)} == {
            f"10.213.{cluster.octet}.{i}" for i in (1, 2, 3)}
        up = measure_throughput(cluster, 0, 1, 16 << 20)
        down = measure_throughput(cluster, 2, 0, 16 << 20)
    for measured in (up, down):
        assert abs(measured - rate) / rate < 0.2, f"{measured / 1e6:.1f} Mbit/s vs 200mbit"


# Module-level so it is easy to read: every rank adds rank + 1, and reports how many bytes its
# emulated NIC sent (ip netns exec shows the namespace's own /sys/class/net).
_ALLREDUCE = """
import datetime, os, torch, torch.distributed as dist
dev = os.environ["GLOO_SOCKET_IFNAME"]
def tx():
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
t = torch.full((1 << 18,), float(dist.get_rank() + 1))
before = tx()
dist.all_reduce(t)
print("RESULT", t.min().item(), t.max().item(), tx() - before, flush=True)
dist.destroy_process_group()
"""


@needs_netem
def test_gloo_all_reduce_between_two_namespaces(clean):
    lines: list[tuple[int, str]] = []
    results = run_in_cluster(2, "1gbit", lambda i, env: [sys.executable, "-c", _ALLREDUCE],
                             timeout=60, on_output=lambda i, line: lines.append((i, line)))
    assert [r.returncode for r in results] == [0, 0]
    for r in results:
        _, low, high, sent = next(ln for ln in r.output.splitlines()
                                  if ln.startswith("RESULT")).split()
        assert float(low) == float(high) == 3.0
        assert int(sent) > (1 << 20) // 2  # half the 1 MiB tensor at least crossed the veth
    assert {i for i, line in lines if line.startswith("RESULT")} == {0, 1}


@needs_netem
def test_run_in_cluster_kills_the_rest_when_one_host_fails(clean):
    start = time.monotonic()
    argv = {0: ["sleep", "30"], 1: ["sh", "-c", "echo boom; exit 3"]}
    with pytest.raises(ClusterRunError, match="host 1 exited with code 3") as info:
        run_in_cluster(2, None, lambda i, env: argv[i], timeout=20, grace=1)
    assert time.monotonic() - start < 10
    assert [r.returncode for r in info.value.results] == [None, 3]
    assert "boom" in info.value.results[1].output


@needs_netem
def test_run_in_cluster_times_out(clean):
    with pytest.raises(ClusterRunError, match="timed out"):
        run_in_cluster(1, None, lambda i, env: ["sleep", "30"], timeout=0.5, grace=1)


# The owner imports zentrain.netem without zentrain/__init__.py, which pulls in torch (seconds
# on a busy 2-core machine); netem itself needs only the standard library.
_OWNER = """
import sys, time, types
pkg = types.ModuleType("zentrain")
pkg.__path__ = [sys.argv[1]]
sys.modules["zentrain"] = pkg
from zentrain.netem import EmulatedCluster
cluster = EmulatedCluster(2, "100mbit").open()
worker = cluster.popen(0, ["sleep", "60"], die_with_parent=False)
print(cluster.run_id, worker.pid, flush=True)
time.sleep(60)
"""


def _start_owner() -> tuple[subprocess.Popen, str, int]:
    package_dir = os.path.dirname(os.path.dirname(netem_module.__file__))
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, package_dir], stdout=subprocess.PIPE,
                             text=True)
    run_id, worker = owner.stdout.readline().split()
    assert len(list_namespaces_of(run_id)) == 3
    return owner, run_id, int(worker)


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if ") Z " in f.read():  # a zombie no one reaped yet is dead too
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@needs_netem
def test_sigkilled_owner_is_swept_by_the_next_cluster(clean):
    owner, run_id, worker = _start_owner()
    owner.kill()
    owner.wait()
    assert len(list_namespaces_of(run_id)) == 3  # SIGKILL: nothing could clean up
    with EmulatedCluster(1, rate=None):
        assert _ours(run_id) == []
    assert _gone(worker), "the stale cluster's worker survived the sweep"
    assert sweep_stale() == []


@needs_netem
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_owner_cleans_up_before_dying(sig, clean):
    owner, run_id, worker = _start_owner()
    os.kill(owner.pid, sig)
    assert owner.wait(timeout=20) != 0
    assert _ours(run_id) == []
    assert _gone(worker)
    if sig == signal.SIGTERM:
        assert owner.returncode == -signal.SIGTERM  # the default action ran after cleanup


# -- zentrain run --emulate-bandwidth: a whole training run in the cluster -----------------------
@needs_netem
@pytest.mark.slow
def test_run_with_emulated_bandwidth_trains_in_namespaces(tmp_path, clean):
    import json

    small = ["--set", "data.max_bytes=800000", "--set", "model.vocab_size=512",
             "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
             "--set", "model.seq_len=32", "--set", "train.batch_size=4",
             "--set", "train.eval_batches=1", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    cmd = [sys.executable, "-m", "zentrain.cli", "run", "--nproc", "2", "--emulate-bandwidth",
           "200mbit", "--set", "train.steps=3", "--set", "sync.scheme=zen", *small,
           "--run-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert steps[-1]["sync_bytes_sent"] > 0
    # --port has no meaning there, and --resume needs a checkpoint: one-line errors, no cluster.
    for extra, msg in ((["--port", "29999"], "picks its own rendezvous address"),
                       (["--resume", "--run-dir", str(tmp_path / "none")], "no committed")):
        r = subprocess.run(cmd[:8] + extra, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
