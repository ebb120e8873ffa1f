import math

from zentrain.config import load_config
from zentrain.train import lr_at


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0",
                             "train.min_lr_ratio=0.1"])
    assert math.isclose(lr_at(cfg, 0), 0.1)
    assert math.isclose(lr_at(cfg, 9), 1.0)
    assert math.isclose(lr_at(cfg, 10), 1.0)
    assert math.isclose(lr_at(cfg, 100), 0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_error_feedback_under_adamw_is_warned_about(capsys):
    from zentrain.config import load_config
    from zentrain.train import _maybe_warn_ef_adamw

    _maybe_warn_ef_adamw(load_config(None, ["sync.compress=topk"]), 0, 2)
    assert "error-feedback-and-adamw" in capsys.readouterr().err
    for sets, rank, world in ((["sync.compress=topk", "compress.error_feedback=false"], 0, 2),
                              (["sync.compress=powersgd"], 0, 2),
                              (["sync.compress=topk",
                                "compress.method_for=blocks.*=powersgd"], 0, 2),
                              (["sync.compress=topk"], 1, 2), (["sync.compress=topk"], 0, 1)):
        _maybe_warn_ef_adamw(load_config(None, sets), rank, world)
        assert capsys.readouterr().err == "", sets


def test_sparse_schemes_seed_zen_hashes_from_train_seed():
    from zentrain.sync import build_grad_sync
    from zentrain.train import _sync_opts

    for scheme in ("zen", "auto", "sparcml", "omnireduce", "agsparse"):
        cfg = load_config(None, [f"sync.scheme={scheme}", "train.seed=42"])
        sync = build_grad_sync(scheme, **_sync_opts(cfg))  # every sparse scheme accepts it
        assert sync.seed == 42
