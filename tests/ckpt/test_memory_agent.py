"""Checkpoint agents in real processes (TCP on loopback), workers as in-process clients or
a separate process: commit, replication, torn and corrupt versions, node loss, resume."""

import glob
import inspect
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from zentrain.ckpt import serialize
from zentrain.ckpt.launch import start_local_agents as _start
from zentrain.ckpt.memory import MemoryCheckpointer, MemoryConfig
from zentrain.ckpt.wire import ProtocolError, connect, recv_msg, request, send_msg
from zentrain.testing import run_ranks


def state_for(rank, step, n=50_000):
    """A rank's state at a step; the worker subprocess gets this function's source."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"w": torch.randn(n, generator=g), "ids": torch.randint(0, 9, (7,), generator=g),
            "step": step, "lr": 0.1 / step}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture
def cluster():
    """start(nodes, local_world, **agent_options) -> agent handles; all stopped after the
    test, which also checks they exit cleanly on SIGTERM and leave nothing in /dev/shm."""
    started = []

    def start(nodes, local_world=1, m=2, **kw):
        job = "t" + uuid.uuid4().hex[:10]
        hs = _start(nodes, local_world, m, job=job, timeout_s=20.0, **kw)
        started.extend(hs)
        return hs

    yield start
    codes = [(h.cfg.node, h.proc.returncode is not None, h.stop()) for h in started]
    for node, was_killed, code in codes:
        assert was_killed or code == 0, f"agent {node} exited with {code} on SIGTERM"
    for h in started:
        assert not glob.glob(f"{h.cfg.shm_root}/zentrain-{h.cfg.job}-*"), "shm left behind"


def clients(hs, local_world, ranks=None, **kw):
    """Worker-side clients for ``ranks`` (default: all), ``local_world`` ranks per node."""
    addrs = [h.addr for h in hs]
    world = len(hs) * local_world
    return [MemoryCheckpointer(MemoryConfig(hs[0].cfg.job, addrs, node=r // local_world,
                                            chunk_bytes=64 << 10, **kw), r, world)
            for r in (range(world) if ranks is None else ranks)]


def save_steps(cks, steps, **kw):
    for step in steps:
        for ck in cks:
            ck.save_async(step, state_for(ck.rank, step, **kw))
        for ck in cks:
            st = ck.wait(timeout=60)
            assert st.ok, st.error


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def committed(hs):
    return [h.status()["committed"] for h in hs]


def flip_byte(path, pos=100):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def test_commit_replicate_and_recover_a_lost_node_from_its_peer(cluster):
    hs = cluster(2, local_world=2)
    cks = clients(hs, 2)
    save_steps(cks, [1, 2, 3])
    wait_until(lambda: committed(hs) == [[3], [3]], what="step 3 committed on both agents")
    # Only the newest committed step is kept; each agent holds its own ranks and the
    # replicas of the other node's (m = 2 copies in all).
    for h in hs:
        assert h.status()["shards"] == [[0, 3, 0], [1, 3, 0], [2, 3, 1], [3, 3, 1]]
        files = [p.name for p in h.cfg.dir.iterdir()]
        assert len([f for f in files if f.startswith(("own-", "from"))]) == 4
        # Besides: the sync-window flags, and at most one dropped own shard per local rank
        # kept for the worker's next snapshot (the zero-copy path recycles files).
        assert "window" in files and not [f for f in files if f.startswith("fill-")]
        assert len([f for f in files if f.startswith("free-")]) <= 2
    for ck in cks:
        step, state = ck.load_latest()
        assert step == 3 and same(state, state_for(ck.rank, 3))
        assert ck.last_load_source == ck.cfg.node  # local agent first
    with pytest.raises(ProtocolError, match="serves job"):
        request(hs[0].addr, {"op": "latest", "job": "other"}, 5)

    hs[1].kill()  # node 1 is gone, its RAM with it
    for ck in cks[2:]:
        ck.close()
    restarted = clients(hs, 2, ranks=[2, 3])  # node 1's ranks, restarted
    for ck in restarted:
        step, state = ck.load_latest()
        assert step == 3 and same(state, state_for(ck.rank, 3))
        assert ck.last_load_source == 0
    st = restarted[0].save_async(4, state_for(2, 4))  # its agent is down: reported, not raised
    restarted[0].wait(timeout=30)
    assert not st.ok and "Connection" in st.error
    for ck in cks[:2] + restarted:
        ck.close()


WORKER = '''
import sys, torch
from zentrain.ckpt.memory import MemoryCheckpointer, MemoryConfig
job, addrs, big = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
ck = MemoryCheckpointer(MemoryConfig(job, addrs, node=0, chunk_bytes=1 << 20, local=False),
                        0, 2)
for step in (1, 2):
    ck.save_async(step, state_for(0, step, big))
    assert ck.wait(60).ok
ck.cfg.send_bytes_per_s = 4e6  # a slow link, so the kill lands mid-transfer
ck.save_async(3, state_for(0, 3, big))
ck.wait(120)
print("step 3 finished: the test should have killed this worker", flush=True)
'''
WORKER = "import torch\n" + inspect.getsource(state_for) + WORKER


LOCAL_WORKER = '''
import sys, time, torch
from zentrain.ckpt.memory import MemoryCheckpointer, MemoryConfig
job, addrs = sys.argv[1], sys.argv[2].split(",")
ck = MemoryCheckpointer(MemoryConfig(job, addrs, node=0, chunk_bytes=1 << 16), 0, 2)
assert ck._dir is not None, "the local agent's directory should be used"
for step in (1, 2):
    ck.save_async(step, state_for(0, step))
    assert ck.wait(60).ok
with ck.paused():  # the snapshot is taken, but its CRCs (and the handoff) wait
    ck.save_async(3, state_for(0, 3))
    print("filled", flush=True)
    time.sleep(120)
'''
LOCAL_WORKER = "import torch\n" + inspect.getsource(state_for) + LOCAL_WORKER


def test_worker_killed_before_its_local_handoff_never_commits(cluster):
    """The zero-copy path: a worker killed after filling its file but before handing it to
    the agent leaves a fill file nobody adopts; the step never commits, and the restarted
    rank removes the file and loads the previous step."""
    hs = cluster(2, local_world=1)
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_WORKER, hs[0].cfg.job,
                             ",".join(h.addr for h in hs)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        (rank1,) = clients(hs, 1, ranks=[1], wait_commit=False)  # runs ahead of rank 0
        save_steps([rank1], [1, 2, 3])
        assert proc.stdout.readline().strip() == "filled"
        assert list(hs[0].cfg.dir.glob("fill-r0-*"))
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Step 2's replica waited while the worker sat in its window; once the window has been
    # open too long (the worker died inside it) the agent stops waiting for it.
    wait_until(lambda: committed(hs) == [[2], [2]], timeout=60, what="step 2 committed")
    time.sleep(0.5)
    assert committed(hs) == [[2], [2]]  # never step 3
    (restarted,) = clients(hs, 1, ranks=[0])
    assert not list(hs[0].cfg.dir.glob("fill-r0-*")), "the dead worker's fill file is removed"
    step, state = restarted.load_latest()
    assert step == 2 and same(state, state_for(0, 2))
    restarted.close()
    rank1.close()


def test_deferred_snapshot_is_the_state_at_save_time(cluster):
    """With ``defer`` the copy runs in the background; once ``wait_snapshot`` returns the
    caller may change the tensors, and the checkpoint still holds the values saved."""
    hs = cluster(1, local_world=1)
    (ck,) = clients(hs, 1)
    state = state_for(0, 1, n=2_000_000)
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    st = ck.save_async(1, state, defer=True)
    ck.wait_snapshot()
    state["w"].add_(1.0)  # the optimizer step that follows
    assert ck.wait(60).ok and st.copy_s > 0
    step, got = ck.load_latest()
    assert step == 1 and same(got, want)
    ck.close()


def test_staged_snapshot_is_handed_over_as_a_file(cluster):
    """The path CUDA state takes (a staging buffer, then the agent's file in the
    background, no TCP), run with CPU tensors: the snapshot is the state at save time,
    the agent adopts a file, and the staging buffer is reused for the next step."""
    hs = cluster(1, local_world=1)
    (ck,) = clients(hs, 1)
    plain = ck.save_async(1, state_for(0, 1))
    assert ck.wait(60).ok and plain.handoff == "adopt"
    ck._stage_cpu = True
    for step in (2, 3):
        state = state_for(0, step, n=1_000_000)
        want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        st = ck.save_async(step, state)
        state["w"].add_(1.0)  # staged in save_async: later changes are not in the snapshot
        assert ck.wait(60).ok, st.error
        assert st.handoff == "adopt" and st.copy_s > 0
        got_step, got = ck.load_latest()
        assert got_step == step and same(got, want)
    ck.close()


def test_worker_killed_mid_transfer_never_commits_its_torn_step(cluster):
    hs = cluster(2, local_world=1)
    big = 4_000_000  # 16 MB at 4 MB/s: four seconds in which to kill it
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, hs[0].cfg.job,
                             ",".join(h.addr for h in hs), str(big)], env=env)
    try:
        (rank1,) = clients(hs, 1, ranks=[1], wait_commit=False)  # runs ahead of rank 0
        save_steps([rank1], [1, 2, 3])

        def mid_transfer():
            assert proc.poll() is None, f"worker exited early with {proc.returncode}"
            return any(r[:2] == [0, 3] and 0 < r[3] < r[4]
                       for r in hs[0].status()["receiving"])
        wait_until(mid_transfer, timeout=90, what="rank 0 streaming step 3")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: all(not h.status()["receiving"] for h in hs), what="torn puts dropped")
    for h in hs:
        s = h.status()
        assert s["committed"] == [2]
        assert [0, 3] not in [sh[:2] for sh in s["shards"]]  # the torn step-3 shard is gone
        assert not list(Path(h.cfg.dir).glob("*.part"))
    with pytest.raises(ProtocolError, match="no shard for rank 0 step 3"):
        request(hs[0].addr, {"op": "get", "job": hs[0].cfg.job, "rank": 0, "step": 3}, 10)
    (restarted,) = clients(hs, 1, ranks=[0])  # torchrun restarts rank 0
    step, state = restarted.load_latest()
    assert step == 2 and same(state, state_for(0, 2, big))
    restarted.close()
    rank1.close()


def raw_put(addr, job, rank, step, state, flip_at=None):
    """Send a put by hand; ``flip_at`` damages the payload after its CRCs were computed."""
    flat = serialize.flatten(state)
    buf = serialize.new_buffer(flat.nbytes)
    serialize.pack_into(flat, buf)
    data = bytearray(buf.numpy().tobytes())
    header = serialize.make_header(flat, serialize.chunk_crcs(data, 4096), 4096)
    if flip_at is not None:
        data[flip_at] ^= 1
    with connect(addr, 10) as s:
        send_msg(s, {"op": "put", "job": job, "rank": rank, "step": step, "header": header})
        s.sendall(data)
        return recv_msg(s)


def test_bad_checksum_is_never_loaded(cluster):
    hs = cluster(2, local_world=1, keep_committed=2)
    job = hs[0].cfg.job
    cks = clients(hs, 1)
    save_steps(cks, [1, 2, 3])
    wait_until(lambda: committed(hs) == [[3, 2], [3, 2]], what="steps 3 and 2 committed")

    # Damaged in transit: refused with a clear error, so step 4 can never commit.
    reply = raw_put(hs[0].addr, job, 0, 4, state_for(0, 4), flip_at=5000)
    assert not reply["ok"] and "checksum mismatch" in reply["error"]
    cks[1].save_async(4, state_for(1, 4))
    assert cks[1].wait(30).ok
    time.sleep(0.3)
    assert committed(hs) == [[3, 2], [3, 2]]

    # Damaged at rest: the local copy is refused, the replica on node 1 is used ...
    flip_byte(hs[0].cfg.dir / "own-r0-s3")
    step, state = cks[0].load_latest()
    assert step == 3 and same(state, state_for(0, 3)) and cks[0].last_load_source == 1
    assert [0, 3, 0] not in hs[0].status()["shards"]  # the damaged copy was dropped
    # ... and with every copy of step 3 damaged, the previous committed step is loaded.
    flip_byte(hs[1].cfg.dir / "from0-r0-s3")
    step, state = cks[0].load_latest()
    assert step == 2 and same(state, state_for(0, 2))

    # A good copy of step 4 from rank 0 completes it: the bad put left no stale state.
    assert raw_put(hs[0].addr, job, 0, 4, state_for(0, 4))["ok"]
    wait_until(lambda: committed(hs) == [[4, 3], [4, 3]], what="step 4 committed")
    for ck in cks:
        ck.close()


def _collective_load(rank, world, job, addrs):
    ck = MemoryCheckpointer(MemoryConfig(job, addrs, node=rank), rank, world)
    step, state = ck.load_latest()  # a process group is up: the ranks agree on one step
    ck.close()
    return step, same(state, state_for(rank, step))


def test_collective_load_agrees_on_a_step_every_rank_can_read(cluster):
    hs = cluster(2, local_world=1, keep_committed=2)
    cks = clients(hs, 1)
    save_steps(cks, [1, 2, 3])
    wait_until(lambda: committed(hs) == [[3, 2], [3, 2]], what="steps 3 and 2 committed")
    flip_byte(hs[1].cfg.dir / "own-r1-s3")  # rank 1 can no longer read step 3 anywhere
    flip_byte(hs[0].cfg.dir / "from1-r1-s3")
    for ck in cks:
        ck.close()
    out = run_ranks(_collective_load, 2, hs[0].cfg.job, [h.addr for h in hs], timeout=120)
    assert out == [(2, True), (2, True)]  # rank 0 alone would have taken step 3


def test_step_commits_only_when_replicas_are_acked(cluster):
    # Replica traffic throttled to a trickle: both workers' shards are stored locally
    # right away, but no node can prepare, so nothing is committed or loadable.
    hs = cluster(2, local_world=1, forward_bytes_per_s=10_000)
    cks = clients(hs, 1, wait_commit=False)
    save_steps(cks, [1])
    time.sleep(0.5)
    for h, ck in zip(hs, cks):
        s = h.status()
        assert s["committed"] == [] and [ck.rank, 1, ck.cfg.node] in s["shards"]
        assert s["prepared"] == {}  # not even this node's own vote without replica acks
        assert ck.load_latest() is None
        ck.close()


def test_a_save_ends_only_once_its_step_is_committed_on_every_node(cluster):
    # The relay is throttled (8 MB at 40 MB/s: ~0.2 s), so a save that ended at the local
    # handoff would be reported done before the peers held its replica.
    hs = cluster(2, local_world=1, forward_bytes_per_s=40e6)
    cks = clients(hs, 1)
    for ck in cks:
        ck.save_async(1, state_for(ck.rank, 1, n=2_000_000))
    for ck in cks:
        st = ck.wait(timeout=60)
        assert st.ok and st.committed is True and st.commit_s > 0.05
        assert hs[ck.cfg.node].status()["committed"] == [1]
        assert [ck.rank, 1, ck.cfg.node] in hs[1 - ck.cfg.node].status()["shards"]
    hs[1].kill()  # the other node is gone: the next save must not hang on its commit
    st = cks[0].save_async(2, state_for(0, 2))
    assert cks[0].wait(timeout=60) is st and st.ok and st.committed is False
    assert st.commit_s < 4
    for ck in cks:
        ck.close()


def test_a_step_that_cannot_commit_slows_one_save_not_every_save(cluster, monkeypatch):
    from zentrain.ckpt import memory
    monkeypatch.setattr(memory, "COMMIT_WAIT_S", 0.5)
    hs = cluster(2, local_world=1)
    ck = clients(hs, 1, ranks=[0])[0]  # node 1's worker never saves: nothing commits
    save_steps([ck], [1])
    first = ck.history[-1]
    assert first.ok and first.committed is False and 0.4 < first.commit_s < 3
    save_steps([ck], [2, 3])
    assert [s.committed for s in list(ck.history)[-2:]] == [None, None]
    ck.close()


def test_paused_holds_traffic_until_the_window_closes(cluster):
    hs = cluster(1)
    ck = clients(hs, 1)[0]
    with ck.paused():
        st = ck.save_async(1, state_for(0, 1))
        time.sleep(0.4)
        assert all(r[3] == 0 for r in hs[0].status()["receiving"])
        assert hs[0].status()["shards"] == []
    ck.wait(30)
    assert st.ok and st.paused_s >= 0.3 and st.snapshot_s < st.background_s
    wait_until(lambda: committed(hs) == [[1]], what="step 1 committed")
    ck.close()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 64), nn.Dropout(0.2), nn.Linear(64, 1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x)))).squeeze(-1)


def _train(model, opt, steps, ck=None, start=0):
    losses = []
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        with ck.paused() if ck else _Null():  # where the gradient sync would run
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if ck:
            ck.save_async(step + 1, {"model": model.state_dict(), "optim": opt.state_dict(),
                                     "rng": torch.get_rng_state(), "step": step + 1})
    return losses


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fresh(seed):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_training_resumed_from_memory_is_bit_identical(cluster):
    model, opt = _fresh(0)
    ref_losses = _train(model, opt, 6)
    ref = [p.detach().clone() for p in model.parameters()]

    hs = cluster(1)
    ck = clients(hs, 1)[0]
    model, opt = _fresh(0)
    _train(model, opt, 4, ck)
    ck.wait(30)
    wait_until(lambda: committed(hs) == [[4]], what="step 4 committed")
    _train(model, opt, 5, start=4)  # a fifth step runs, then the worker dies before saving it
    ck.close()

    model, opt = _fresh(123)  # the restarted worker builds everything from scratch
    ck = clients(hs, 1)[0]
    step, state = ck.load_latest()
    assert step == 4
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"])
    losses = _train(model, opt, 6, start=step)
    ck.close()
    assert losses == ref_losses[4:]
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p, r)


def test_suggested_interval_and_config_errors():
    from zentrain.ckpt.agent import AgentConfig
    from zentrain.ckpt.memory import SaveStats

    ck = MemoryCheckpointer(MemoryConfig("j", ["127.0.0.1:9"], node=0), 0, 1)
    assert ck.suggested_interval(0.2) == 1  # nothing measured yet
    for bg in (0.5, 0.9, 0.7):
        ck.history.append(SaveStats(1, 10, 0.0, 0.01, background_s=bg + 0.1, paused_s=0.1,
                                    ok=True))
    ck.history.append(SaveStats(2, 10, 0.0, 0.01, background_s=9.0, ok=False))  # ignored
    assert ck.suggested_interval(0.2) == 4  # median 0.7 s of transfer per 0.2 s step
    ck.close()
    with pytest.raises(ValueError, match="rank=2, world=2"):
        MemoryCheckpointer(MemoryConfig("j", ["127.0.0.1:9"], node=0), 2, 2)
    with pytest.raises(ValueError, match="node=2, nodes=2, 1 peers"):
        AgentConfig(node=2, nodes=2, peers=["127.0.0.1:9"])


def test_agent_never_imports_torch():
    """Every agent would pay 3+ s of CPU and ~300 MB for it (docs/recovery.md)."""
    code = ("import sys, zentrain.ckpt.agent, zentrain.ckpt.launch; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(
                           Path(serialize.__file__).resolve().parents[2])))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
