"""Persistent (DCP) checkpoints never run code from the checkpoint: a pickle payload planted
in the data file (not the metadata) is refused before it executes, while everything the
trainer legitimately stores still loads with ``weights_only=True``."""

import dataclasses
import io
import os
import pickle

import pytest
import torch
from torch import nn

from zentrain.ckpt import persistent


class _Evil:
    target = ""

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.target}",))


def _model_and_optim(seed, **adam):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, **adam)
    model(torch.randn(5, 8)).sum().backward()
    optim.step()
    return model, optim


def _plant(ckpt, fqn, obj):
    """Append ``torch.save(obj)`` to the data file holding ``fqn`` and point the metadata
    (a clean, allow-listed pickle) at it: only the data file carries the payload."""
    md = persistent.SafeReader(ckpt).read_metadata()
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    hits = [i for i in md.storage_data if i.fqn == fqn]
    assert hits, sorted(i.fqn for i in md.storage_data)
    for idx in hits:
        info = md.storage_data[idx]
        f = ckpt / info.relative_path
        off = f.stat().st_size
        with open(f, "ab") as fh:
            fh.write(payload)
        md.storage_data[idx] = dataclasses.replace(info, offset=off, length=len(payload))
    md.storage_meta = None
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("fqn", ["optim.param_groups.0.lr", "optim.param_groups.0.betas"])
def test_code_planted_in_the_data_file_is_refused_unexecuted(tmp_path, fqn):
    model, optim = _model_and_optim(0)
    persistent.save(tmp_path, 3, model, optim, {"step": torch.tensor(3)})
    _Evil.target = str(tmp_path / "pwned")
    _plant(tmp_path / "checkpoints" / "step_000003", fqn, _Evil())
    with pytest.raises(persistent.UnsafeCheckpoint,
                       match=rf"{fqn}' is not plain data: .*GLOBAL (os|posix)\.system"):
        persistent.load(tmp_path, model, optim, {"step": torch.tensor(0)})
    assert not (tmp_path / "pwned").exists()


def test_safe_reader_refuses_a_planner_that_unpickles(tmp_path):
    """SafeReader cannot be paired with DCP's default planner (weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    model, optim = _model_and_optim(0)
    persistent.save(tmp_path, 1, model, optim, {"step": torch.tensor(1)})
    state = persistent._app_state(model, optim, {"step": torch.tensor(0)})
    with pytest.raises(BaseException, match="SafeReader needs a SafeLoadPlanner"):
        dcp.load(state, storage_reader=persistent.SafeReader(
            tmp_path / "checkpoints" / "step_000001"), planner=DefaultLoadPlanner())


def test_everything_the_trainer_stores_loads_with_weights_only(tmp_path):
    """param_groups with floats, tuples, bools and None (AdamW with amsgrad), a loader-like
    cursor, an RNG state, step counters, strings and nested lists."""
    model, optim = _model_and_optim(0, amsgrad=True, betas=(0.8, 0.95), foreach=False)
    extra = {"step": torch.tensor(11), "data": {"cursor": torch.tensor(1234),
                                                "epoch": torch.tensor(2)},
             "rng": torch.get_rng_state(), "note": "a string", "counts": [1, 2.5, True, None],
             "pair": (3, "x")}
    persistent.save(tmp_path, 11, model, optim, extra)
    other, other_optim = _model_and_optim(1, amsgrad=True, betas=(0.8, 0.95), foreach=False)
    got = {"step": torch.tensor(0), "data": {"cursor": torch.tensor(0), "epoch": torch.tensor(0)},
           "rng": torch.zeros_like(torch.get_rng_state()), "note": "", "counts": [],
           "pair": ()}
    assert persistent.load(tmp_path, other, other_optim, got) == 11
    assert int(got["step"]) == 11 and int(got["data"]["cursor"]) == 1234
    assert torch.equal(got["rng"], extra["rng"])
    assert got["note"] == "a string" and got["counts"] == [1, 2.5, True, None]
    assert tuple(got["pair"]) == (3, "x")
    g, h = optim.param_groups[0], other_optim.param_groups[0]
    assert h["betas"] == (0.8, 0.95) and h["amsgrad"] is True and h["lr"] == g["lr"]
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    st, so = optim.state_dict()["state"][0], other_optim.state_dict()["state"][0]
    assert all(torch.equal(st[k], so[k]) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def test_latest_pointer_is_read_or_refused_in_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000004").mkdir(parents=True)
    latest = root / "latest"
    for text, want in (("4\n", 4), ("step_000004", 4), ("8", None)):  # 8: no such directory
        latest.write_text(text)
        assert persistent.latest_step(tmp_path) == want
    latest.write_text("four")
    with pytest.raises(ValueError, match=r"holds 'four', not a step number"):
        persistent.latest_step(tmp_path)
