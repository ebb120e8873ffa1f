"""Training with every sparse scheme matches training with ``dense``, step by step.

Three gloo ranks train a tiny GPT (on a tiny text corpus written here) and a tiny DeepFM
(synthetic clicks) for a few SGD-with-momentum steps under ``zentrain.DataParallel`` with each sync
scheme, from the same initial weights and batches. Per-step losses and final parameters
must match ``dense`` to a tight tolerance (the schemes sum in different orders, so they are
not required to be bitwise equal), every rank must end with bit-identical parameters, and
the embedding tables must really have gone through the sparse reducer (not the dense
fallback), or the comparison would be vacuous. Three ranks, not two: with two, ``a + b =
b + a`` and every scheme sums in the same order, so summation order would go untested.
``auto`` profiles (with zen) for two steps and uses its choice for the other two.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from zentrain.testing import run_ranks

SCHEMES = ("dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")
STEPS = 4
WORLD = 3
# zen is left out of the candidates so that auto really switches reducers mid-training
# (it profiles with zen; here the cost model would pick zen again at 3 ranks).
AUTO = {"profile_steps": 2, "recheck_every": 0, "candidates": ("sparcml", "agsparse", "allreduce")}


def _gpt_overrides(tmp) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "dense", "rank", "tensor", "hash",
             "bitmap", "push", "pull", "server", "worker", "row", "table", "grad", "sum"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                       for _ in range(300))
    (tmp / "corpus.txt").write_text(text)
    return ["model.name=gpt", "model.n_layer=1", "model.n_head=2", "model.d_model=16",
            "model.seq_len=16", "model.vocab_size=300", f'data.paths=["{tmp}/corpus.txt"]',
            f'data.cache_dir="{tmp}/cache"', "data.eval_fraction=0.05", "train.batch_size=4",
            "train.warmup_steps=0", "metrics.progress=false"]


_DEEPFM = ["model.name=deepfm", "model.num_fields=4", "model.rows_per_field=200",
           "model.embed_dim=4", "model.mlp_dims=[16]", "train.batch_size=16",
           "data.synthetic_samples=5000", "train.warmup_steps=0", "metrics.progress=false"]


def _train(rank: int, world: int, overrides: list[str], scheme: str, sparse: bool) -> dict:
    import zentrain
    from zentrain.config import load_config
    from zentrain.data import build_data
    from zentrain.models import build_model

    cfg = load_config(None, overrides + [f"model.sparse_embedding={str(sparse).lower()}"])
    data = build_data(cfg, rank, world, is_builder=False)
    torch.manual_seed(cfg.train.seed + 17 * rank)  # different init per rank: the broadcast
    model = build_model(cfg.model)                 # from rank 0 must make them equal
    dp = zentrain.DataParallel(model, sync=scheme, **(AUTO if scheme == "auto" else {}))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # (Not zentrain.train.build_optimizer: importing the trainer costs seconds per rank.)
    # SGD, not AdamW: Adam divides by sqrt(v), so a gradient that is zero in exact
    # arithmetic (attention's key bias: softmax ignores shifts) but rounding noise in
    # practice takes a full lr-sized step whose sign depends on the summation order. With
    # three ranks the schemes sum in different orders (even the dense buckets: another
    # bucket layout gives other ring chunks), so AdamW would differ by ~lr whatever the
    # sync; SGD keeps differences at the size of the rounding.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    losses, paths, used = [], set(), set()
    for step in range(STEPS):
        _, loss = dp(**data.train_batch(step, 0))
        loss.backward()
        paths |= {v for k, v in dp.last_stats.extra.items() if k.endswith(".path")}
        used |= {v for k, v in dp.last_stats.extra.items() if k.endswith(".scheme")}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in params.values())).hexdigest()
    moved = max(float((params[k] - init[k]).abs().max()) for k in params
                if params[k].is_floating_point())
    # numpy, not tensors: torch would pass tensors through shared memory that dies with us.
    return {"losses": losses, "params": {k: v.numpy() for k, v in params.items()},
            "digest": digest, "paths": sorted(paths), "used": sorted(used),
            "choices": sorted(str(v) for k, v in dp.last_stats.extra.items()
                              if k.endswith(".choice")),
            "moved": moved}


def _all(rank: int, world: int, runs: dict) -> dict:
    return {key: _train(rank, world, *args) for key, args in runs.items()}


@pytest.mark.slow
def test_sparse_schemes_train_like_dense(tmp_path):
    from zentrain.config import load_config
    from zentrain.data import build_data

    gpt = _gpt_overrides(tmp_path)
    build_data(load_config(None, gpt), 0, WORLD, is_builder=True)  # tokenizer + token cache
    runs = {(model, s): (ov, s, False) for model, ov in (("gpt", gpt), ("deepfm", _DEEPFM))
            for s in SCHEMES}
    runs[("deepfm", "zen-coo")] = (_DEEPFM, "zen", True)  # sparse=True: COO gradients
    res = run_ranks(_all, WORLD, runs, timeout=300)
    for (model, scheme), _ in runs.items():
        where = f"{model}/{scheme}"
        mine = [r[(model, scheme)] for r in res]
        ref = [r[(model, "dense")] for r in res]
        assert len({m["digest"] for m in mine}) == 1, f"{where}: ranks differ"
        if scheme != "dense":
            assert mine[0]["paths"] == [scheme.removesuffix("-coo")], (where, mine[0]["paths"])
        if scheme == "auto":  # profiled with zen, then synced with what it chose
            m = mine[0]
            assert m["choices"] and "None" not in m["choices"], m["choices"]
            assert "zen" not in m["choices"], m["choices"]
            assert set(m["choices"]) | {"zen"} == set(m["used"]), (m["choices"], m["used"])
        for rank in range(WORLD):
            torch.testing.assert_close(mine[rank]["losses"], ref[rank]["losses"],
                                       rtol=1e-5, atol=1e-6, msg=f"{where}: losses")
        for name, p in mine[0]["params"].items():
            torch.testing.assert_close(torch.from_numpy(p),
                                       torch.from_numpy(ref[0]["params"][name]),
                                       rtol=1e-5, atol=1e-6,
                                       msg=f"{where}: {name}")
    # Not vacuous: parameters moved, and the two ranks trained on different batches.
    for model in ("gpt", "deepfm"):
        assert res[0][(model, "dense")]["moved"] > 1e-3
        assert res[0][(model, "dense")]["losses"] != res[1][(model, "dense")]["losses"]
