import pytest
import torch
import torch.distributed as dist

from zentrain.testing import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_ranks_collects_results():
    assert run_ranks(_sum_ranks, 3) == [6.0, 6.0, 6.0]


def test_run_ranks_reports_rank_error():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_ranks(_fail_on_one, 2)
