import numpy as np
import pytest
import torch

from zentrain.config import Config
from zentrain.data import build_data
from zentrain.data.corpus import DataError
from zentrain.data.criteo_index import prepare_criteo_index, vocab_dir
from zentrain.data.criteo_vocab import count_values, vocab_from_counts
from zentrain.data.ctr import CTRBatches, SyntheticCTR, hash_categories, read_criteo, splitmix64
from zentrain.evaluation import auc, evaluate
from zentrain.models import DeepFM
from zentrain.models.ctr_layout import CTRLayout, build_ctr_layout


def synth(rows=1000, fields=26, seed=7, alpha=1.1) -> SyntheticCTR:
    return SyntheticCTR(fields, 13, rows, alpha, seed)


def test_splitmix64_reference_value():
    # First output of the reference splitmix64 generator seeded with 0.
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_synthetic_sample_depends_only_on_seed_and_index():
    g = synth()
    a = g.take(np.array([5, 123456, 7]))
    b = synth().take(np.array([7]))  # a fresh generator, another batch composition
    for k in ("dense", "cats", "labels"):
        assert torch.equal(a[k][2], b[k][0])
    c = synth(seed=8).take(np.array([7]))
    assert not torch.equal(a["cats"][2], c["cats"][0])


def test_synthetic_shapes_ranges_and_skew():
    g = synth(rows=1000)
    b = g.take(np.arange(20000))
    assert b["dense"].shape == (20000, 13) and b["dense"].dtype == torch.float32
    assert b["cats"].shape == (20000, 26) and b["cats"].dtype == torch.long
    assert b["labels"].shape == (20000,) and set(b["labels"].unique().tolist()) == {0.0, 1.0}
    assert 0 <= int(b["cats"].min()) and int(b["cats"].max()) < 1000
    assert float(b["dense"].min()) >= 0 and torch.isfinite(b["dense"]).all()
    assert 0.1 < float(b["labels"].mean()) < 0.6
    hot = []
    for f in range(26):
        counts = torch.bincount(b["cats"][:, f], minlength=1000)
        assert counts.max() > 0.05 * 20000  # Zipf: the hottest id is far above uniform (0.1%)
        hot.append(int(counts.argmax()))
    assert len(set(hot)) > 20  # a per-field permutation scatters the hot rows


def layout(field_rows="criteo", ids="frequency", fields=26, rows=40000) -> CTRLayout:
    cfg = Config().model
    cfg.name, cfg.num_fields, cfg.rows_per_field = "deepfm", fields, rows
    cfg.field_rows, cfg.id_layout = field_rows, ids
    return build_ctr_layout(cfg)


def first_partition_share(lay: CTRLayout, seed=1234, n=8, batch=256) -> np.ndarray:
    """Share of the non-zero rows of n ranks' batches (each rank's distinct table rows)
    that fall in each of n equal contiguous partitions of the table (ZEN's C3)."""
    g = SyntheticCTR(lay.num_fields, 13, lay, 1.1, seed)
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.unique(lay.rows_of(g.take(rng.integers(0, 10**6, batch))
                                                 ["cats"].numpy())) for _ in range(n)])
    bounds = np.arange(1, n) * lay.total_rows // n
    return np.bincount(np.searchsorted(bounds, rows, side="right"), minlength=n) / len(rows)


def test_frequency_ids_are_skewed_and_hashed_ids_are_not():
    """The default layout puts most non-zeros in the first of 8 contiguous partitions (ZEN
    §2.1: > 60% in all six models); the scattered layout spreads them evenly."""
    freq = first_partition_share(layout())
    assert freq[0] > 0.5 and freq.argmax() == 0
    flat = first_partition_share(layout("uniform", "hashed"))
    assert flat.max() < 0.2 and flat.min() > 0.06  # 1/8 = 0.125 each when uniform


def test_layouts_differ_only_by_a_bijection_of_ids():
    """Same seed: identical dense features and labels under both id layouts; field f's
    hashed id is a fixed permutation of its frequency rank, and rank 0 is the hottest."""
    lf, lh = layout(fields=5, rows=300), layout(ids="hashed", fields=5, rows=300)
    idx = np.arange(20000)
    a, b = SyntheticCTR(5, 13, lf, 1.1, 3).take(idx), SyntheticCTR(5, 13, lh, 1.1, 3).take(idx)
    assert torch.equal(a["dense"], b["dense"]) and torch.equal(a["labels"], b["labels"])
    for f, size in enumerate(lf.field_rows):
        fa, fb = a["cats"][:, f], b["cats"][:, f]
        assert 0 <= int(fa.min()) and int(fa.max()) < size and int(fb.max()) < size
        pairs = set(zip(fa.tolist(), fb.tolist()))
        assert len(pairs) == len(set(fa.tolist())) == len(set(fb.tolist()))  # one-to-one
        assert int(torch.bincount(fa).argmax()) == 0
    assert not torch.equal(a["cats"], b["cats"])


def test_frequency_layout_deterministic_by_seed():
    lay = layout(fields=26, rows=500)
    idx = np.array([3, 77, 123456])
    a = SyntheticCTR(26, 13, lay, 1.1, 9).take(idx)
    b = SyntheticCTR(26, 13, lay, 1.1, 9).take(idx[::-1].copy())
    for k in ("dense", "cats", "labels"):
        assert torch.equal(a[k], b[k].flip(0))
    c = SyntheticCTR(26, 13, lay, 1.1, 10).take(idx)
    assert not torch.equal(a["cats"], c["cats"])
    with pytest.raises(ValueError, match="a layout of 26 fields for 5 fields"):
        SyntheticCTR(5, 13, lay, 1.1, 9)


def test_ctr_batches_stateless_and_sharded():
    g = synth()
    mk = lambda r, seed=1: CTRBatches(g, (0, 10_000), (10_000, 10_512), 64, 2, seed, r, 2)  # noqa: E731
    a, a2, b = mk(0), mk(0), mk(1)
    assert torch.equal(a.train_batch(4, 1)["cats"], a2.train_batch(4, 1)["cats"])
    assert not torch.equal(a.train_batch(4, 1)["cats"], a.train_batch(4, 0)["cats"])
    assert not torch.equal(a.train_batch(4, 1)["cats"], b.train_batch(4, 1)["cats"])
    assert not torch.equal(a.train_batch(4, 1)["cats"], mk(0, seed=2).train_batch(4, 1)["cats"])
    assert a.shard == (0, 5000) and b.shard == (5000, 10_000)
    ea, eb = a.eval_batches(), b.eval_batches()
    assert len(ea) == 2 and all(torch.equal(x["cats"], y["cats"]) for x, y in zip(ea, eb))
    # Eval samples are ids 10_000.. (disjoint from training ids), in order.
    assert torch.equal(ea[0]["cats"], g.take(np.arange(10_000, 10_064))["cats"])


def test_synthetic_labels_are_learnable():
    """A small DeepFM trained for 150 steps beats chance clearly on held-out ids."""
    cfg = Config()
    cfg.model.name = "deepfm"
    cfg.model.rows_per_field = 500
    cfg.model.embed_dim = 8
    cfg.model.mlp_dims = [32]
    cfg.train.batch_size = 256
    cfg.train.eval_batches = 8
    bundle = build_data(cfg, 0, 1, is_builder=True)
    assert bundle.unit == "samples" and bundle.items_per_batch == 256
    torch.manual_seed(0)
    model = DeepFM(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = evaluate(model, bundle.eval_batches(), "deepfm")
    for step in range(150):
        _, loss = model(**bundle.train_batch(step, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate(model, bundle.eval_batches(), "deepfm")
    assert after["auc"] > 0.7, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 0.05


# --- Criteo TSV -------------------------------------------------------------------------------

def row(label="1", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x1000 + i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


@pytest.fixture
def tsv(tmp_path):
    lines = [
        row("0"),
        row("1", ints=["", "-3", "7"] + [""] * 10, cats=[""] * 26),  # missing and negative
        row("1") + "\r",  # a CRLF line ending is fine
        "1\t2\t3",  # line 4: too few columns
        row("2"),  # line 5: bad label
        row("0", ints=["x"] + ["1"] * 12),  # line 6: non-integer dense
        row("0", cats=["zzzz"] + ["ab"] * 25),  # line 7: non-hex category
        "",
        row("1", cats=["68fd1e64", "80e26c9b"] + [""] * 24),
    ]
    p = tmp_path / "day.tsv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_criteo_reader_parses_and_skips_bad_rows(tsv):
    reports: list[str] = []
    arr = read_criteo([tsv], 13, 26, 40000, report=reports.append)
    assert [r.split(" ")[0] for r in reports] == [f"{tsv}:{n}:" for n in (4, 5, 6, 7)]
    assert "columns" in reports[0] and "label" in reports[1]
    assert len(arr) == 4
    assert arr.labels.tolist() == [0.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(arr.dense[0], np.log1p(np.arange(13)), rtol=1e-6)
    np.testing.assert_allclose(arr.dense[1][:3], [0.0, 0.0, np.log1p(7)], rtol=1e-6)
    assert arr.dense.dtype == np.float32 and arr.cats.dtype == np.int64
    assert (arr.cats >= 0).all() and (arr.cats < 40000).all()
    # A missing category has one row per field (the same in every sample), different
    # across fields.
    assert arr.cats[1, 2:].tolist() == arr.cats[3, 2:].tolist()
    assert len(set(arr.cats[1].tolist())) > 20
    assert arr.cats[2].tolist() == arr.cats[0].tolist()
    # Stable hashing (not Python's salted hash()): pinned values.
    assert arr.cats[3, :3].tolist() == [6436, 16759, 26605]
    assert hash_categories(np.array([[0x68FD1E64]], dtype=np.uint64), 1000).item() == 436


def test_criteo_reader_fails_when_asked(tsv):
    with pytest.raises(DataError, match=f"{tsv}:4: bad Criteo row"):
        read_criteo([tsv], 13, 26, 40000, on_error="fail")


def test_criteo_through_build_data(tsv, tmp_path, caplog):
    cfg = Config()
    cfg.model.name = "deepfm"
    cfg.data.paths = [str(tmp_path / "*.tsv")]
    cfg.data.eval_fraction = 0.25
    cfg.train.batch_size = 3
    cfg.train.eval_batches = 2
    bundle = build_data(cfg, 1, 2, is_builder=False)
    assert f"{tsv}:5" in caplog.text
    b = bundle.train_batch(0, 0)
    assert b["dense"].shape == (3, 13) and b["cats"].shape == (3, 26) and b["labels"].shape == (3,)
    # 4 rows: 3 train (rank 1 of 2 gets row 1..2), 1 eval row repeated to fill the batches.
    assert set(b["labels"].tolist()) <= {1.0}
    ev = bundle.eval_batches()
    assert len(ev) == 2 and all(torch.equal(e["cats"][0], ev[0]["cats"][1]) for e in ev)
    assert "4 rows" in bundle.describe
    with pytest.raises(DataError, match="--nproc 4 larger than the data allows"):
        build_data(cfg, 0, 4, is_builder=False)


def test_auc_helper_sees_signal_in_synthetic_ground_truth():
    """Sanity for the generator itself: the hidden logit ranks labels well."""
    g = synth(rows=1000)
    idx = np.arange(5000)
    b = g.take(idx)
    # Recompute the hidden logit from the public sample: dense enters monotonically, so a
    # one-feature score from the highest-weight dense feature already beats chance.
    d = int(np.argmax(np.abs(g.dense_weight)))
    score = b["dense"][:, d] * float(np.sign(g.dense_weight[d]))
    assert auc(score, b["labels"]) > 0.55


# --- frequency vocabulary -----------------------------------------------------------------------

def test_vocab_ranks_by_count_and_pools_rare_values():
    # Field 0: 7 x5, 9 x3, 4 x3 (tie: smaller value first), 8 x1 (rare); field 1: 6 rows
    # of value 2 and distinct singletons.
    col0 = [7] * 5 + [9] * 3 + [4] * 3 + [8]
    col1 = [2] * 6 + [100 + i for i in range(6)]
    raw = np.array([col0, col1], dtype=np.uint64).T
    v = vocab_from_counts(count_values([raw[:5], raw[5:]]), (10, 3), min_count=2)
    ids = v.apply(np.array([[7, 2], [4, 100], [9, 2], [8, 101], [12345, 5]], dtype=np.uint64))
    assert ids[:, 0].tolist() == [0, 1, 2, 9, 9]  # most frequent -> 0; rare/unseen -> 9
    assert ids[:, 1].tolist() == [0, 2, 0, 2, 2]  # field 1's out-of-vocabulary id is 2
    # A field with more frequent values than rows keeps the most frequent ones (3 rows: 2
    # values and the out-of-vocabulary id; 9 loses the tie with 4).
    small = vocab_from_counts(count_values([raw]), (3, 3), min_count=1)
    assert small.apply(np.array([[7, 2], [9, 2], [4, 2]], dtype=np.uint64))[:, 0].tolist() \
        == [0, 2, 1]
    with pytest.raises(ValueError, match="vocab_min_count=0"):
        vocab_from_counts(count_values([raw]), (3, 3), min_count=0)


def test_criteo_reader_frequency_vocab(tsv):
    lay = layout(fields=26, rows=100)
    arr = read_criteo([tsv], 13, 26, lay, report=None, vocab_min_count=2)
    # Rows 0 and 2 share every category (2 of 4 rows): the most frequent value of each
    # field -> id 0. Row 1's empty fields also occur in row 3 (fields 2..) -> id 1 there;
    # fields 0-1 of rows 1 and 3 are seen once -> their field's last id.
    last = np.array(lay.field_rows) - 1
    assert (arr.cats[0] == 0).all() and (arr.cats[2] == 0).all()
    assert (arr.cats[1, 2:] == 1).all() and (arr.cats[3, 2:] == 1).all()
    assert (arr.cats[[1, 3], :2] == last[:2]).all()


def test_criteo_index_vocab_cached_and_shared(tsv, tmp_path):
    lay = layout(fields=26, rows=100)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="is not built"):
        prepare_criteo_index([tsv], 13, 26, cache, "skip", False, None, lay)
    idx = prepare_criteo_index([tsv], 13, 26, cache, "skip", True, None, lay)
    assert idx.vocab is not None and idx.n_rows == 4
    meta = tmp_path / "cache" / idx.vocab / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = prepare_criteo_index([tsv], 13, 26, cache, "skip", True, None, lay)
    assert again == idx and meta.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = prepare_criteo_index([tsv], 13, 26, cache, "skip", False, None, lay)
    assert other.vocab == idx.vocab
    assert vocab_dir(meta.parent.parent, layout(fields=26, rows=101), 2) != meta.parent
    from zentrain.data.criteo_index import CriteoRows

    rows = CriteoRows(idx, 13, 26, lay)
    ref = read_criteo([tsv], 13, 26, lay, report=None)
    assert np.array_equal(rows.take(np.arange(4))["cats"], ref.cats)
    rows.close()
    hashed = prepare_criteo_index([tsv], 13, 26, cache, "skip", True, None,
                                  layout(ids="hashed", fields=26, rows=100))
    assert hashed.vocab is None
    with pytest.raises(DataError, match="need the index's vocabulary"):
        CriteoRows(hashed, 13, 26, lay)
