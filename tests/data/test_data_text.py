import random
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

import zentrain.data.text as textmod
import zentrain.data.tokenizer as tokmod
from zentrain.config import Config
from zentrain.data import build_data
from zentrain.data.corpus import DataError
from zentrain.data.text import TextBatches, prepare_text_data, text_cache_dir
from zentrain.testing import run_ranks

WORDS = ["def", "class", "return", "self", "import", "lambda", "yield", "value", "index",
         "tensor", "gradient", "sparse", "shard", "rank", "world", "batch", "token"]


def write_corpus(root, n_docs=40, seed=0) -> list[str]:
    """A small deterministic corpus: n_docs .txt files of pseudo-code (~60 KB in all)."""
    rng = random.Random(seed)
    docs = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                 + f" = {rng.randint(0, 999)}" for _ in range(25)]
        doc = "\n".join(lines) + "\n"
        (root / f"doc{i:03d}.txt").write_text(doc)
        docs.append(doc)
    return docs


def make_cfg(tmp_path, paths=None, **data) -> Config:
    cfg = Config()
    cfg.data.paths = [str(tmp_path / "corpus" / "*.txt")] if paths is None else paths
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.eval_fraction = 0.1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.model.vocab_size = 300
    cfg.model.seq_len = 16
    cfg.train.batch_size = 4
    cfg.train.eval_batches = 2
    cfg.metrics.progress = False
    return cfg


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_build_roundtrip(tmp_path, corpus):
    td = prepare_text_data(make_cfg(tmp_path), is_builder=True)
    assert 256 < td.vocab_size <= 300
    assert td.tokens.dtype == np.uint16
    assert td.meta["n_docs"] == len(corpus)
    ids = np.asarray(td.tokens).tolist()
    assert ids[-1] == td.eot_id and ids.count(td.eot_id) == len(corpus)
    # Documents come back exactly, in file order, one per end-of-text token.
    decoded, start = [], 0
    for i, t in enumerate(ids):
        if t == td.eot_id:
            decoded.append(td.tokenizer.decode(ids[start:i]))
            start = i + 1
    assert decoded == corpus
    # BPE actually merged: fewer tokens than bytes.
    assert len(ids) < 0.6 * sum(len(d) for d in corpus)


def test_cache_is_reused_not_rebuilt(tmp_path, corpus, monkeypatch):
    cfg = make_cfg(tmp_path)
    td = prepare_text_data(cfg, is_builder=True)
    mtimes = {p.name: p.stat().st_mtime_ns for p in td.cache.iterdir()}

    def boom(*a, **k):
        raise AssertionError("rebuilt a cached tokenizer/token file")

    monkeypatch.setattr(tokmod, "train_tokenizer", boom)
    monkeypatch.setattr(textmod, "encode_corpus", boom)
    again = prepare_text_data(cfg, is_builder=True)
    assert {p.name: p.stat().st_mtime_ns for p in again.cache.iterdir()} == mtimes
    assert np.array_equal(again.tokens, td.tokens)


def test_changed_corpus_or_vocab_gets_a_new_cache(tmp_path, corpus):
    cfg = make_cfg(tmp_path)
    first = text_cache_dir(cfg)
    cfg.model.vocab_size = 290
    assert text_cache_dir(cfg) != first
    cfg.model.vocab_size = 300
    (tmp_path / "corpus" / "doc000.txt").write_text("changed")
    assert text_cache_dir(cfg) != first


def test_non_builder_only_opens(tmp_path, corpus):
    cfg = make_cfg(tmp_path)
    with pytest.raises(DataError, match="is not built"):
        prepare_text_data(cfg, is_builder=False)
    built = prepare_text_data(cfg, is_builder=True)
    opened = prepare_text_data(cfg, is_builder=False)
    assert np.array_equal(built.tokens, opened.tokens)


def test_interrupted_build_is_completed(tmp_path, corpus):
    """A run killed mid-encode leaves a tokenizer, a temp file and no meta.json."""
    cfg = make_cfg(tmp_path)
    td = prepare_text_data(cfg, is_builder=True)
    tok_mtime = (td.cache / "tokenizer.json").stat().st_mtime_ns
    want = np.array(td.tokens)
    (td.cache / "meta.json").unlink()
    (td.cache / "tokens.bin").unlink()
    stale = td.cache / ".tokens.bin.tmp-99999-deadbeef"
    stale.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="is not built"):
        prepare_text_data(cfg, is_builder=False)
    again = prepare_text_data(cfg, is_builder=True)
    assert not stale.exists()
    assert (td.cache / "tokenizer.json").stat().st_mtime_ns == tok_mtime
    assert np.array_equal(again.tokens, want)


def test_invalid_utf8_and_jsonl_in_corpus(tmp_path, corpus, caplog):
    (tmp_path / "corpus" / "zz_bad.txt").write_bytes(b"bad \xff\xfe bytes\n" * 50)
    (tmp_path / "extra.jsonl").write_text('{"text": "from jsonl"}\nnot json\n')
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "corpus" / "*.txt"),
                                    str(tmp_path / "extra.jsonl")])
    td = prepare_text_data(cfg, is_builder=True)
    assert td.meta["n_docs"] == len(corpus) + 2
    # Reported once (while training), not again while encoding.
    assert caplog.text.count(f"{tmp_path / 'extra.jsonl'}:2") == 1


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text("nope\n")
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "empty.txt"), str(tmp_path / "bad.jsonl")])
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_text_data(cfg, is_builder=True)


def test_build_data_fixes_vocab_size(tmp_path, corpus):
    cfg = make_cfg(tmp_path)
    cfg.model.vocab_size = 5000  # far more than this corpus can give
    bundle = build_data(cfg, rank=0, world=1, is_builder=True)
    assert bundle.vocab_size == cfg.model.vocab_size < 5000
    assert bundle.unit == "tokens" and bundle.items_per_batch == 4 * 16
    assert "\n" not in bundle.describe and "tokens" in bundle.describe
    batch = bundle.train_batch(0, 0)
    assert batch["idx"].shape == batch["targets"].shape == (4, 16)
    assert batch["idx"].dtype == torch.long
    assert int(batch["idx"].max()) < cfg.model.vocab_size
    assert len(bundle.eval_batches()) == 2


def test_stdlib_slice(tmp_path):
    cfg = make_cfg(tmp_path, paths=[], max_bytes=200_000)
    cfg.model.vocab_size = 400
    bundle = build_data(cfg, rank=0, world=2, is_builder=True)
    assert "python stdlib" in bundle.describe
    n_files = int(re.search(r"\(([\d,]+) files, 0.2 MB\)", bundle.describe)[1].replace(",", ""))
    assert n_files < 100  # the files actually read, not the whole stdlib
    assert bundle.vocab_size == 400
    assert bundle.train_batch(3, 0)["idx"].shape == (4, 16)


# --- batches (no tokenizer needed: a token stream 0, 1, 2, ... makes windows readable) ------

def batches(n=1000, rank=0, world=1, seed=1, eval_fraction=0.1, seq_len=16, bs=4):
    return TextBatches(np.arange(n, dtype=np.uint32), seq_len, bs, eval_fraction, 3, seed,
                       rank, world)


def test_windows_are_contiguous_and_shifted():
    b = batches().train_batch(0, 0)
    idx, tgt = b["idx"], b["targets"]
    assert torch.equal(tgt, idx + 1)
    assert torch.equal(idx[:, 1:], idx[:, :-1] + 1)


def test_batches_are_a_pure_function_of_the_key():
    a = batches(rank=1, world=2)
    b = batches(rank=1, world=2)  # a fresh object: no hidden state carries over
    assert torch.equal(a.train_batch(7, 1)["idx"], b.train_batch(7, 1)["idx"])
    a.train_batch(0, 0)  # order of calls does not matter
    assert torch.equal(a.train_batch(3, 0)["idx"], b.train_batch(3, 0)["idx"])
    assert not torch.equal(a.train_batch(7, 1)["idx"], a.train_batch(7, 0)["idx"])
    assert not torch.equal(a.train_batch(7, 1)["idx"], a.train_batch(8, 1)["idx"])
    assert not torch.equal(a.train_batch(7, 1)["idx"],
                           batches(rank=1, world=2, seed=2).train_batch(7, 1)["idx"])


def test_rank_shards_are_disjoint_and_cover_the_train_range():
    world, n = 3, 1000
    ranks = [batches(n, r, world) for r in range(world)]
    assert ranks[0].shard[0] == 0 and ranks[-1].shard[1] == ranks[0].train_len == 900
    for a, b in zip(ranks, ranks[1:]):
        assert a.shard[1] == b.shard[0]
    for r, b in enumerate(ranks):
        lo, hi = b.shard
        seen = torch.cat([torch.cat([x["idx"], x["targets"][:, -1:]], 1)
                          for x in (b.train_batch(s, 0) for s in range(50))])
        assert lo <= int(seen.min()) and int(seen.max()) < hi, f"rank {r} left its shard"
    first = [b.train_batch(0, 0)["idx"] for b in ranks]
    assert not torch.equal(first[0] - ranks[0].shard[0], first[1] - ranks[1].shard[0])


def test_eval_batches_fixed_and_identical_across_ranks():
    evals = [batches(rank=r, world=2, seed=r).eval_batches() for r in range(2)]
    assert len(evals[0]) == 3
    for x, y in zip(*evals):
        assert torch.equal(x["idx"], y["idx"])
        assert int(x["idx"].min()) >= 900  # inside the eval tail
    assert batches(eval_fraction=0.0).eval_batches() == []


def test_too_many_ranks_for_the_data():
    with pytest.raises(DataError, match=r"--nproc 64 larger than the data allows.*14 tokens"):
        batches(n=1000, world=64, rank=0)
    with pytest.raises(DataError, match="eval range"):
        batches(n=100, eval_fraction=0.1)


# --- distributed: rank 0 builds, barrier, the others open -----------------------------------

def _collective_build(rank, world, cfg):
    bundle = build_data(cfg, rank, world, is_builder=True) if rank == 0 else None
    dist.barrier()
    if rank != 0:
        bundle = build_data(cfg, rank, world, is_builder=False)
    return (cfg.model.vocab_size, bundle.eval_batches()[0]["idx"].tolist(),
            bundle.train_batch(0, 0)["idx"].tolist())


@pytest.mark.slow
def test_rank0_builds_others_open(tmp_path, corpus):
    cfg = make_cfg(tmp_path)
    (r0, r1) = run_ranks(_collective_build, 2, cfg, timeout=120)
    assert r0[0] == r1[0] and r0[1] == r1[1]  # same vocab, same eval data
    assert r0[2] != r1[2]  # own shards
