import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only add contention
    (a 60-step overfit took 37 s with 2 threads under load, 8 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_bad_record_reports():
    """Bad records are reported once per process tree: give every test a fresh one."""
    from zentrain.data import badrecords

    badrecords.forget()
    yield
    badrecords.forget()
