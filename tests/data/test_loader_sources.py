"""Source readers: text formats, pre-tokenized .bin, streamed Criteo, corrupt records, config."""

import json
import random

import numpy as np
import pytest
import torch

from zentrain.config import Config, ConfigError, SourceConfig, load_config
from zentrain.data import badrecords, build_loader
from zentrain.data.corpus import DataError
from zentrain.data.ctr import read_criteo
from zentrain.models.ctr_layout import build_ctr_layout

WORDS = ["def", "class", "return", "self", "import", "lambda", "yield", "value", "index",
         "tensor", "gradient", "sparse", "shard", "rank"]


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    (tmp_path / "txt").mkdir()
    for i in range(20):
        (tmp_path / "txt" / f"d{i}.txt").write_text("\n".join(text(rng, 8) for _ in range(20)))
    with open(tmp_path / "web.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": text(rng, 30)}) + "\n")
        f.write('{"text": broken\n')  # line 41
        f.write(json.dumps({"text": text(rng, 30)}) + "\n")
    return tmp_path


def gpt_cfg(tmp_path, sources=None, **data):
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.eval_fraction = 0.1
    cfg.data.num_workers = 0
    cfg.data.sources = sources or []
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.model.vocab_size = 300
    cfg.model.seq_len = 16
    cfg.train.batch_size = 4
    cfg.train.eval_batches = 2
    cfg.metrics.progress = False
    return cfg


def test_two_text_sources_share_one_tokenizer(corpus, caplog):
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "txt" / "*.txt"), name="code"),
                           SourceConfig(path=str(corpus / "web.jsonl"), weight=3.0)])
    ld = build_loader(cfg, 0, 1, is_builder=True)
    assert f"{corpus / 'web.jsonl'}:41: bad JSONL record" in caplog.text
    assert ld.names == ["code", "web"] and ld.unit == "tokens"
    assert 256 < cfg.model.vocab_size == ld.vocab_size <= 300
    b = ld.train_batch(0, 0)
    assert b["idx"].shape == b["targets"].shape == (4, 16)
    assert torch.equal(b["idx"][:, 1:], b["targets"][:, :-1])  # shifted windows
    assert int(b["idx"].max()) < ld.vocab_size
    assert sum(ld.mixture(s)["web"] for s in range(50)) == 150  # 3/4 of 4 x 50
    assert "code [auto" in ld.describe and "web.jsonl" in ld.describe
    assert len(ld.eval_batches()) == 2
    # A second build opens the cache; other ranks open without building.
    again = build_loader(gpt_cfg(corpus, cfg.data.sources), 1, 2, is_builder=False)
    assert again.vocab_size == ld.vocab_size


def test_windows_cover_each_token_once_per_epoch(tmp_path):
    ids = np.arange(1, 16 * 30 + 2, dtype=np.uint16)  # exactly 30 windows of 16 + 1
    ids.tofile(tmp_path / "a.bin")
    cfg = gpt_cfg(tmp_path, [SourceConfig(path=str(tmp_path / "a.bin"))], eval_fraction=0.0,
                  global_batch_size=6)
    cfg.model.vocab_size = 1000
    ld = build_loader(cfg, 0, 1, True)
    assert ld.vocab_size is None and cfg.model.vocab_size == 1000  # nothing to tokenize
    starts = sorted(int(ld.train_batch(s, 0)["idx"][i, 0]) for s in range(5) for i in range(6))
    assert starts == [1 + 16 * j for j in range(30)]


def test_bin_token_dtype_and_out_of_vocab(tmp_path):
    np.arange(40, dtype=np.uint32).tofile(tmp_path / "a.bin")
    cfg = gpt_cfg(tmp_path, [SourceConfig(path=str(tmp_path / "*.bin"), token_dtype="uint32")],
                  eval_fraction=0.0, global_batch_size=2)  # 39 tokens: 2 windows of 16 + 1
    cfg.model.vocab_size = 300
    assert build_loader(cfg, 0, 1, True).train_batch(0, 0)["idx"].max() < 40
    (tmp_path / "b.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match=r"b\.bin: 7 bytes is not a whole number of uint32"):
        build_loader(cfg, 0, 1, True)
    (tmp_path / "b.bin").unlink()
    np.full(40, 5000, dtype=np.uint32).tofile(tmp_path / "c.bin")
    cfg.data.global_batch_size = 4
    ld = build_loader(cfg, 0, 1, True)
    with pytest.raises(DataError, match=r"c\.bin: token id 5000 .* vocabulary size 300"):
        for s in range(4):
            ld.train_batch(s, 0)


def test_text_and_bin_sources_mix(corpus):
    np.arange(200, dtype=np.uint16).tofile(corpus / "pre.bin")
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "txt")),
                           SourceConfig(path=str(corpus / "pre.bin"), name="pre")])
    ld = build_loader(cfg, 0, 1, True)
    assert ld.names == ["txt", "pre"]
    assert [s.fmt for s in ld.sources] == ["auto", "bin"]
    ld.train_batch(0, 0)


def test_bad_jsonl_line_is_fatal_when_asked(corpus):
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "web.jsonl"), format="jsonl")],
                  on_error="fail")
    with pytest.raises(DataError, match=r"web\.jsonl:41: bad JSONL record"):
        build_loader(cfg, 0, 1, True)


def test_explicit_txt_format_reads_jsonl_as_plain_text(corpus):
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "web.jsonl"), format="txt")],
                  on_error="fail")
    build_loader(cfg, 0, 1, True)  # no JSON parsing, so nothing is corrupt


def test_parquet_source(corpus):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(1)
    rows = [text(rng, 30) for _ in range(40)] + [None]
    pq.write_table(pa.table({"text": rows}), corpus / "p.parquet")
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "p.parquet"))], on_error="fail")
    with pytest.raises(DataError, match=r"p\.parquet: row 41: bad parquet record"):
        build_loader(cfg, 0, 1, True)
    cfg.data.on_error = "skip"
    assert build_loader(cfg, 0, 1, True).sources[0].fmt == "parquet"


def test_format_must_fit_the_model(corpus):
    cfg = gpt_cfg(corpus, [SourceConfig(path=str(corpus / "web.jsonl"), format="criteo")])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format: 'criteo' does not fit"):
        build_loader(cfg, 0, 1, True)


def test_too_small_source_is_a_clear_error(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "a.bin")
    with pytest.raises(DataError, match="'a' is too small: 0 windows"):
        build_loader(gpt_cfg(tmp_path, [SourceConfig(path=str(tmp_path / "a.bin"))]), 0, 1, True)


# --- Criteo, streamed ---------------------------------------------------------------------------

def row(label="1", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x1000 + i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


@pytest.fixture
def tsv(tmp_path):
    rng = random.Random(2)
    lines = []
    for i in range(60):
        lines.append(row(str(i % 2), [str(rng.randint(0, 50)) for _ in range(13)],
                         [f"{rng.randint(0, 999):x}" for _ in range(26)]))
    lines[9] = "1\t2\t3"  # line 10: too few columns
    lines[29] = row("7")  # line 30: bad label
    p = tmp_path / "day.tsv"
    p.write_text("\n".join(lines) + "\n")
    return p


def ctr_cfg(tmp_path, paths, **data):
    cfg = Config()
    cfg.model.name = "deepfm"
    cfg.model.rows_per_field = 500
    cfg.data.paths = paths
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.eval_fraction = 0.1
    cfg.data.num_workers = 0
    cfg.train.batch_size = 5
    cfg.train.eval_batches = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_criteo_rows_stream_by_offset_and_match_the_reader(tsv, tmp_path, caplog):
    cfg = ctr_cfg(tmp_path, [str(tsv)], eval_fraction=0.0, global_batch_size=58)
    ld = build_loader(cfg, 0, 1, is_builder=True)
    assert f"{tsv}:10: bad Criteo row" in caplog.text and f"{tsv}:30: bad Criteo row" in caplog.text
    assert ld.sources[0].n_train == 58
    batch = ld.train_batch(0, 0)  # one epoch: every valid row once
    ref = read_criteo([tsv], 13, 26, build_ctr_layout(cfg.model), report=None)
    # Sort both by (cats, dense): frequency ids pool this file's one-off values, so cats
    # alone do not tell rows apart.
    order = np.lexsort(np.hstack([batch["cats"].numpy(), batch["dense"].numpy()]).T[::-1])
    ref_order = np.lexsort(np.hstack([ref.cats, ref.dense]).T[::-1])
    assert np.array_equal(batch["cats"].numpy()[order], ref.cats[ref_order])
    assert np.allclose(batch["dense"].numpy()[order], ref.dense[ref_order])
    assert np.array_equal(batch["labels"].numpy()[order], ref.labels[ref_order])
    assert "'day': 2 bad records skipped" in caplog.text
    # Reopened by the same process (or a non-builder rank): said already, nothing again.
    caplog.clear()
    build_loader(cfg, 0, 1, is_builder=True)
    build_loader(cfg, 1, 2, is_builder=False)
    assert caplog.text == ""
    # A new run lists the cached index's bad rows again, as a fresh read would.
    badrecords.forget()
    build_loader(cfg, 0, 1, is_builder=True)
    assert f"{tsv}:10: bad Criteo row" in caplog.text and f"{tsv}:30: bad Criteo row" in caplog.text
    assert caplog.text.count("bad Criteo row") == 2


def test_criteo_bad_row_fatal_when_asked(tsv, tmp_path):
    cfg = ctr_cfg(tmp_path, [str(tsv)], on_error="fail")
    with pytest.raises(DataError, match=f"{tsv}:10: bad Criteo row"):
        build_loader(cfg, 0, 1, True)
    build_loader(ctr_cfg(tmp_path, [str(tsv)]), 0, 1, True)  # cache the index (skipping)
    with pytest.raises(DataError, match=f"{tsv}:10: bad Criteo row"):  # still fatal
        build_loader(cfg, 0, 1, True)
    with pytest.raises(DataError, match=f"{tsv}:10: bad Criteo row"):  # on every rank
        build_loader(cfg, 1, 2, False)


def test_criteo_non_builder_needs_the_index(tsv, tmp_path):
    with pytest.raises(DataError, match="is not built"):
        build_loader(ctr_cfg(tmp_path, [str(tsv)]), 1, 2, is_builder=False)


def test_criteo_and_synthetic_mix_with_eval_from_the_file(tsv, tmp_path):
    cfg = ctr_cfg(tmp_path, [], sources=[SourceConfig(path=str(tsv), name="day"),
                                         SourceConfig(format="synthetic", weight=0.5)])
    cfg.data.synthetic_samples = 100
    ld = build_loader(cfg, 0, 1, True)
    assert ld.names == ["day", "synthetic"]
    assert ld.sources[0].n_eval == 5 and ld.sources[0].n_train == 53
    assert len(ld.eval_batches()) == 1
    assert sum(ld.mixture(0).values()) == 5


# --- config -----------------------------------------------------------------------------------

def test_sources_from_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[data]\nglobal_batch_size = 64\n'
                 '[[data.sources]]\npath = "a/*.txt"\nweight = 0.7\nweight_end = 0.2\n'
                 'ramp_steps = 1000\n'
                 '[[data.sources]]\npath = "b.bin"\nformat = "bin"\nname = "pre"\n')
    cfg = load_config(f)
    a, b = cfg.data.sources
    assert (a.path, a.weight, a.weight_end, a.ramp_steps) == ("a/*.txt", 0.7, 0.2, 1000)
    assert (b.format, b.name, b.weight) == ("bin", "pre", 1.0)
    assert cfg.data.global_batch_size == 64


@pytest.mark.parametrize("body,match", [
    ('[[data.sources]]\npth = "x"\n', r"unknown config key data\.sources\[0\]\.pth"),
    ('[[data.sources]]\npath = "x"\n[[data.sources]]\nformat = "csv"\n',
     r"bad value for data\.sources\[1\]\.format: 'csv'"),
    ('[[data.sources]]\nweight = -1.0\n', r"data\.sources\[0\]\.weight must be >= 0"),
    ('[[data.sources]]\nweight = 0.0\n', r"weights sum to 0 at step 0"),
    ('[[data.sources]]\nweight_end = 1.0\n', r"weight_end needs data\.sources\[0\]\.ramp_steps"),
    ('[[data.sources]]\nramp_start = 5\n', r"data\.sources\[0\]\.ramp_start needs a ramp"),
    ('[[data.sources]]\nweight_end = 1.0\nramp_steps = 9\nramp_start = -1\n',
     r"data\.sources\[0\]\.ramp_start must be >= 0 \(got -1\)"),
    ('[[data.sources]]\nweight = 1.0\nweight_end = 0.0\nramp_steps = 10\nramp_start = 50\n',
     r"weights sum to 0 at step 60"),
    ('[data]\nsources = [1]\n', r"bad value for data\.sources\[0\]: 1"),
    ('[data]\nnum_workers = -1\n', r"data\.num_workers must be >= 0"),
])
def test_bad_sources_are_one_line_errors(tmp_path, body, match):
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(f)
    assert "\n" not in str(e.value)


def test_sources_override_from_the_command_line():
    cfg = load_config(None, ['data.sources=[{path = "x.txt", weight = 2}, {path = "y.txt"}]'])
    assert [s.weight for s in cfg.data.sources] == [2.0, 1.0]
