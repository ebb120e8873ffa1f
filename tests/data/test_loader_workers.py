"""Background workers: same batches as in-process, a killed worker loses nothing, errors surface.

Every test bounds its wait: a hung worker would fail the pool's own checks or the test's
``timeout`` on the loader calls, never block CI.
"""

import logging
import os
import signal
import time

import numpy as np
import pytest
import torch

from zentrain.config import Config, SourceConfig
from zentrain.data import build_loader
from zentrain.data.corpus import DataError

pytestmark = pytest.mark.slow


def cfg(workers, **data):
    c = Config()
    c.model.name = "deepfm"
    c.model.rows_per_field = 100
    c.data.synthetic_samples = 64  # 8 steps of 8 per epoch: the tests cross epochs
    c.data.num_workers = workers
    c.data.prefetch = 3
    c.data.global_batch_size = 8
    c.data.sources = [SourceConfig(format="synthetic", name="a", weight=2.0),
                      SourceConfig(format="synthetic", name="b", weight=1.0)]
    c.train.batch_size = 4
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def batches(loader, steps, start=0):
    loader.stall_timeout_s = 30.0  # a lost step fails the test instead of hanging it
    return [loader.train_batch(s, 0) for s in range(start, start + steps)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


@pytest.fixture
def reference():
    return batches(build_loader(cfg(0), 0, 2, True), 20)


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_give_the_in_process_batches(reference, workers):
    ld = build_loader(cfg(workers), 0, 2, True)
    try:
        assert same(batches(ld, 20), reference)
        assert len(ld.worker_pids()) == workers
        assert ld.memory_bytes() > 0
        assert ld.batch_digest(7) == build_loader(cfg(0), 1, 2, True).batch_digest(7)
    finally:
        ld.close()


def test_killed_worker_is_restarted_and_nothing_is_lost(reference, caplog):
    ld = build_loader(cfg(2), 0, 2, True)
    try:
        got = batches(ld, 3)
        victim = ld.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)  # mid-epoch, with steps in flight
        got += batches(ld, 17, start=3)
        assert same(got, reference)
        assert ld.restarts == 1 and victim not in ld.worker_pids()
        assert f"pid {victim}) died with exit code -9" in caplog.text
    finally:
        ld.close()


def test_worker_dying_with_its_step_in_flight(reference, caplog):
    caplog.set_level(logging.WARNING)
    ld = build_loader(cfg(2), 0, 2, True)
    ld._crash_at = (5, 1)  # the worker that gets step 5 dies on it, once
    try:
        assert same(batches(ld, 20), reference)
        assert ld.restarts == 1
        assert "died with exit code 77" in caplog.text and "[5" in caplog.text
    finally:
        ld.close()


def test_worker_that_keeps_dying_is_an_error():
    ld = build_loader(cfg(1), 0, 2, True)
    ld._crash_at = (2, 99)
    try:
        with pytest.raises(DataError, match="died 3 times while building step 2"):
            batches(ld, 5)
    finally:
        ld.close()


def test_out_of_order_steps_and_resume_with_workers(reference):
    ld = build_loader(cfg(2), 0, 2, True)
    try:
        batches(ld, 6)
        assert same(batches(ld, 4, start=2), reference[2:6])  # back: the pool restarts
        # Resume from a 2-rank state on 1 rank: its batch is both old ranks' halves.
        state = ld.state_dict()
        assert int(state["step"]) == 6
        one = build_loader(cfg(2, global_batch_size=0), 0, 1, True)
        one.load_state_dict(state)
        other = build_loader(cfg(0), 1, 2, True)
        for s in range(6, 12):
            want = torch.cat([reference[s]["cats"], other.train_batch(s, 0)["cats"]])
            assert torch.equal(one.train_batch(s, 0)["cats"], want)
        one.close()
    finally:
        ld.close()


def test_worker_errors_surface_with_the_file(tmp_path):
    np.full(200, 9999, dtype=np.uint16).tofile(tmp_path / "bad.bin")
    c = Config()
    c.data.sources = [SourceConfig(path=str(tmp_path / "bad.bin"))]
    c.data.num_workers, c.data.eval_fraction = 1, 0.0
    c.model.vocab_size, c.model.seq_len = 300, 16
    c.train.batch_size = 2
    ld = build_loader(c, 0, 1, True)
    try:
        with pytest.raises(DataError, match=r"bad\.bin: token id 9999"):
            ld.train_batch(0, 0)
    finally:
        ld.close()


def test_close_stops_every_worker():
    ld = build_loader(cfg(2), 0, 2, True)
    ld.train_batch(0, 0)
    pids = ld.worker_pids()
    ld.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert ld.worker_pids() == []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent is the forkserver, not us).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_read_ahead_error_is_raised_by_the_step_it_belongs_to(reference):
    # Step s + 1 is taken on the loader's read-ahead thread while step s trains: a failure
    # there must surface at train_batch(s + 1), after every earlier step was served.
    ld = build_loader(cfg(1), 0, 2, True)
    ld._crash_at = (3, 99)
    try:
        assert same(batches(ld, 3), reference[:3])
        with pytest.raises(DataError, match="died 3 times while building step 3"):
            ld.train_batch(3, 0)
    finally:
        ld.close()


def test_close_returns_while_the_read_ahead_waits_on_a_hung_worker():
    ld = build_loader(cfg(1), 0, 2, True)
    ld.prefetch = 1
    try:
        ld.stall_timeout_s = 30.0
        ld.train_batch(0, 0)
        time.sleep(1.0)  # step 1 is built and taken by the read-ahead thread
        (pid,) = ld.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        ld.train_batch(1, 0)  # built before the stop (one slot: steps 1, 2 were built)
        time.sleep(0.3)
        ld.train_batch(2, 0)
        time.sleep(0.3)
        assert ld._ahead._want == 3  # the thread now waits for the stopped worker's step 3
        t0 = time.monotonic()
    finally:
        ld.close()
    assert time.monotonic() - t0 < 15  # the pool's own kill after 5 s, not the 600 s stall
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)
    assert ld.background_cpu_s > 0
