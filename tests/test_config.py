from pathlib import Path

import pytest

from zentrain.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_debug_toml_is_the_default():
    assert load_config(ROOT / "configs" / "debug.toml").to_dict() == Config().to_dict()


def test_shipped_configs_load():
    for p in sorted((ROOT / "configs").glob("*.toml")):
        load_config(p)


def test_compress_toml_is_the_measured_mix():
    # configs/compress.toml (and the 1/20 variant in its comments) resolve to the matrix
    # by matrix methods of the mixes measured in docs/compression.md
    from dataclasses import replace

    import torch

    from zentrain.compress import CompressConfig, select_params
    from zentrain.compress.auto import resolve_auto
    from zentrain.models import build_model

    cfg = load_config(ROOT / "configs" / "compress.toml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    for extra, mix in (("", "blocks.*,pos_emb=powersgd"),
                       ("tok_emb.weight=topk", "blocks.*,pos_emb=powersgd; tok_emb.weight=topk")):
        auto = resolve_auto(replace(cfg.compress, method_for=extra), model)
        want = CompressConfig(method="topk", rank=8, method_for=mix)
        assert [(n, auto.method_of(n)) for n, _ in select_params(model, auto)] == \
            [(n, want.method_of(n)) for n, _ in select_params(model, want)]
    assert (cfg.sync.scheme, cfg.compress.rank, cfg.compress.ratio) == ("zen", 8, 0.01)


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 7\nlr = 0.5\n[sync]\nscheme = "zen"\n')
    cfg = load_config(f, ["train.lr=0.25", "model.mlp_dims=[8, 4]"])
    assert cfg.train.steps == 7          # file beats default
    assert cfg.train.lr == 0.25          # CLI beats file
    assert cfg.sync.scheme == "zen"
    assert cfg.model.mlp_dims == [8, 4]
    assert cfg.train.batch_size == Config().train.batch_size


@pytest.mark.parametrize("override,match", [
    (["train.stepz=3"], r"unknown config key train\.stepz .*allowed: steps"),
    (["nope.x=1"], r"unknown config section \[nope\]"),
    (["sync.scheme=fast"], r"bad value for sync\.scheme: 'fast' \(allowed: 'ddp'"),
    (["train.steps=1.5"], r"bad value for train\.steps: 1\.5 \(allowed: int\)"),
    (["train.bf16=maybe"], r"bad value for train\.bf16"),
    (["train.steps=0"], r"train\.steps must be >= 1"),
    (["model.d_model=100", "model.n_head=3"], r"divisible"),
    (["steps=3"], r"expected section\.key=value"),
])
def test_bad_input_is_one_line_error(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, override)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nlayers = 3\n")
    with pytest.raises(ConfigError, match=r"model\.layers in .*bad\.toml"):
        load_config(f)


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    f = tmp_path / "broken.toml"
    f.write_text("[model\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(f)


# Each value is just outside the field's range (the audit's list plus the rest of the tree).
@pytest.mark.parametrize("override,match", [
    ("metrics.log_every=0", r"metrics\.log_every must be >= 1 \(got 0\)"),
    ("model.dropout=1.5", r"model\.dropout must be in \[0, 1\) \(got 1\.5\)"),
    ("model.n_layer=0", r"model\.n_layer must be >= 1 \(got 0\)"),
    ("model.seq_len=0", r"model\.seq_len must be >= 1"),
    ("model.embed_dim=0", r"model\.embed_dim must be >= 1"),
    ("model.rows_per_field=0", r"model\.rows_per_field must be >= 1"),
    ("model.mlp_dims=[]", r"model\.mlp_dims must be a non-empty list of numbers >= 1"),
    ("model.mlp_dims=[8, 0]", r"model\.mlp_dims must be .*>= 1 \(got \[8, 0\]\)"),
    ("model.vocab_size=255", r"model\.vocab_size must be >= 256"),
    ("train.eval_every=-1", r"train\.eval_every must be >= 0 \(got -1\)"),
    ("train.eval_batches=0", r"train\.eval_batches must be >= 1"),
    ("train.grad_clip=-0.5", r"train\.grad_clip must be >= 0"),
    ("train.threads=-1", r"train\.threads must be >= 0"),
    ("train.beta1=1.0", r"train\.beta1 must be in \[0, 1\)"),
    ("train.beta2=1.01", r"train\.beta2 must be in \[0, 1\)"),
    ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio must be in \[0, 1\]"),
    ("train.lr=nan", r"train\.lr must be > 0 \(got nan\)"),
    ("train.lr=inf", r"train\.lr must be > 0 \(got inf\)"),
    ("train.weight_decay=-1", r"train\.weight_decay must be >= 0"),
    ("train.seed=-1", r"train\.seed must be in \[0, 4294967295\]"),
    ("data.max_bytes=-1", r"data\.max_bytes must be >= 0"),
    ("data.eval_fraction=1", r"data\.eval_fraction must be in \[0, 1\)"),
    ("data.zipf_alpha=-1", r"data\.zipf_alpha must be >= 0"),
    ("data.synthetic_samples=0", r"data\.synthetic_samples must be >= 1"),
    ("data.sources=[{path = 'a'}, {ramp_steps = -2}]",
     r"data\.sources\[1\]\.ramp_steps must be >= 0"),
    ("sync.dense_threshold=1.5", r"sync\.dense_threshold must be in \[0, 1\]"),
    ("sync.bucket_mb=0", r"sync\.bucket_mb must be > 0"),
    ("parallel.timeout_s=0", r"parallel\.timeout_s must be > 0 \(got 0\.0\)"),
    ("checkpoint.replicas=0", r"checkpoint\.replicas must be >= 1"),
    ("checkpoint.memory_bytes_per_s=-1", r"checkpoint\.memory_bytes_per_s must be >= 0"),
    ("compress.bits=9", r"compress\.bits must be in \[2, 8\]"),
])
def test_out_of_range_values_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_range_boundaries_are_accepted():
    cfg = load_config(None, ["model.dropout=0.0", "train.min_lr_ratio=1.0", "train.eval_every=0",
                             "train.grad_clip=0", "train.threads=0", "data.max_bytes=0",
                             "train.beta2=0.0", "sync.dense_threshold=1.0",
                             "checkpoint.every=0", "train.seed=4294967295"])
    assert cfg.train.min_lr_ratio == 1.0 and cfg.train.seed == 2**32 - 1


def test_every_numeric_field_has_a_range():
    """A numeric field added without an entry in RANGES would go unchecked."""
    from zentrain.config import SourceConfig
    from zentrain.config_ranges import RANGES, numeric_fields

    cfg = Config()
    cfg.data.sources = [SourceConfig()]  # so the walk reaches the per-source fields
    keys = {rkey for _, rkey, _ in numeric_fields(cfg)}
    assert keys == set(RANGES), (keys ^ set(RANGES))
    for key, _, value in numeric_fields(Config()):  # and the defaults are inside them
        for v in value if isinstance(value, list) else [value]:
            assert v in RANGES[key.split("[")[0]], key
