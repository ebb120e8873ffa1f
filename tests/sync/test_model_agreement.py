"""Ranks that build different models get one clear error at construction, never a hang.

Before ``check_same_model`` the ``dense`` scheme died on gloo's size check on one rank
while the other waited forever, and ``_broadcast_state`` "succeeded" between embedding
tables of different sizes. Each scenario below builds a ``zentrain.DataParallel`` on two
ranks whose models differ in one way; every rank must raise the same ``ValueError``
naming the difference, and the process group must still work afterwards.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zentrain.sync.agree import describe_model, first_difference
from zentrain.testing import run_ranks


def _model(rows: int = 50, dtype: torch.dtype = torch.float32, extra: bool = False,
           frozen: bool = False, norm: int = 16) -> nn.Module:
    m = nn.Sequential()
    m.add_module("emb", nn.Embedding(rows, 8))
    m.add_module("fc", nn.Linear(8, 16).to(dtype))
    m.add_module("norm", nn.BatchNorm1d(norm, affine=False))
    if extra:
        m.add_module("head", nn.Linear(16, 1))
    if frozen:
        m.fc.bias.requires_grad_(False)
    return m


# scenario -> (scheme, rank-1 model options, words the error must contain)
SCENARIOS = {
    "table rows": ("dense", {"rows": 60}, "parameter 'emb.weight' is float32[50, 8] on rank 0 "
                                          "but float32[60, 8] on rank 1"),
    "dtype": ("zen", {"dtype": torch.float64}, "parameter 'fc.weight' is float32[16, 8] on "
                                               "rank 0 but float64[16, 8] on rank 1"),
    "buffer": ("agsparse", {"norm": 12}, "buffer 'norm.running_mean' is float32[16] on rank 0 "
                                         "but float32[12] on rank 1"),
    "extra module": ("sparcml", {"extra": True}, "parameter 'head.weight' (float32[1, 16]) "
                                                 "exists on rank 1 but not on rank 0"),
    "frozen": ("dense", {"frozen": True}, "parameter 'fc.bias' is float32[16] on rank 0 but "
                                          "float32[16] (frozen) on rank 1"),
    "ddp": ("ddp", {"rows": 40}, "parameter 'emb.weight' is float32[50, 8] on rank 0 but "
                                 "float32[40, 8] on rank 1"),
}


def _build_each(rank: int, world: int) -> dict:
    import zentrain

    got = {}
    for name, (scheme, opts, _) in SCENARIOS.items():
        torch.manual_seed(0)
        model = _model(**(opts if rank == 1 else {}))
        try:
            zentrain.DataParallel(model, sync=scheme)
            got[name] = "no error"
        except ValueError as e:
            got[name] = str(e)
    # The same model on both ranks passes, and the group still works afterwards.
    torch.manual_seed(rank)
    dp = zentrain.DataParallel(_model(), sync="dense")
    w = dp.module.emb.weight.detach().clone()
    torch.distributed.all_reduce(w)
    got["after"] = bool(torch.equal(w, 2 * dp.module.emb.weight.detach()))
    return got


@pytest.mark.slow
def test_different_models_raise_the_same_clear_error_on_every_rank():
    res = run_ranks(_build_each, 2, timeout=90)
    for name, (_, _, words) in SCENARIOS.items():
        assert res[0][name] == res[1][name], (name, res[0][name], res[1][name])
        msg = res[0][name]
        assert "differs across ranks" in msg and words in msg, (name, msg)
        assert "\n" not in msg
    assert res[0]["after"] and res[1]["after"]


def test_first_difference_names_the_first_mismatch_and_order():
    a, b = describe_model(_model()), describe_model(_model())
    swapped = [a[1], a[0], *a[2:]]
    assert first_difference([a, b, swapped]).startswith(
        "the order differs: entry 0 is parameter 'emb.weight' on rank 0 but parameter "
        "'fc.weight' on rank 2")
    fewer = a[1:]
    assert first_difference([a, fewer]) == (
        "parameter 'emb.weight' (float32[50, 8]) exists on rank 0 but not on rank 1")
