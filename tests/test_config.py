from pathlib import Path

import pytest

from zentrain.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_debug_toml_is_the_default():
    assert load_config(ROOT / "configs" / "debug.toml").to_dict() == Config().to_dict()


def test_shipped_configs_load():
    for p in sorted((ROOT / "configs").glob("*.toml")):
        load_config(p)


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
