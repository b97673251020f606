"""Config as data: every impossible value names its field, strings parse by the field's type, presets
build, and the closed-form sizes agree with counts written out by hand. No torch needed here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpt_small.config import PRESETS, GPTConfig, TrainConfig, apply_overrides, parse_duration, parse_value
from gpt_small.config_sources import load_toml, parse_set_args, resolve_configs
from gpt_small.errors import ConfigError, GPTSmallError


# ---------------------------------------------------------------- GPTConfig checks

@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_embd=30, n_head=2, pos_encoding="rope"), "n_head"),  # head size 15 cannot be split in pairs
    (dict(n_embd=33, n_head=3, pos_encoding="sinusoidal"), "n_embd"),
    (dict(activation="swish"), "activation"),
    (dict(pos_encoding="alibi"), "pos_encoding"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(block_size=True), "block_size"),  # a bool is not a size
    (dict(n_head=2.0), "n_head"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_bad_model_value_names_its_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        GPTConfig(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GPTSmallError)


def test_odd_head_size_is_fine_without_rope():
    assert GPTConfig(n_embd=30, n_head=2, pos_encoding="learned").head_size == 15


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        GPTConfig(128)  # type: ignore[misc]


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = GPTConfig.from_preset(name)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert all(getattr(cfg, k) == v for k, v in PRESETS[name].items())


def test_from_preset_unknown_name():
    with pytest.raises(ConfigError, match="'nope'.*tiny"):
        GPTConfig.from_preset("nope")


def test_from_preset_overrides():
    cfg = GPTConfig.from_preset("tiny", pos_encoding="rope", n_layer=3)
    assert (cfg.pos_encoding, cfg.n_layer) == ("rope", 3)
    assert (cfg.n_embd, cfg.vocab_size) == (PRESETS["tiny"]["n_embd"], PRESETS["tiny"]["vocab_size"])
    assert cfg.activation == GPTConfig().activation  # untouched fields keep the dataclass default
    assert "pos_encoding" not in PRESETS["tiny"]  # the table itself is not modified
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig.from_preset("tiny", n_head=5)  # overrides are checked like any value


# ---------------------------------------------------------------- parsing strings and TOML values

def test_apply_overrides_parses_by_field_type():
    base = GPTConfig.from_preset("tiny")
    cfg = apply_overrides(base, {"n_layer": "8", "bias": "false", "qk_norm": "true", "dropout": "0.1",
                                 "rope_theta": "5e5", "activation": "gelu"})
    assert cfg.n_layer == 8 and type(cfg.n_layer) is int
    assert cfg.bias is False and cfg.qk_norm is True
    assert cfg.dropout == 0.1 and cfg.rope_theta == 500000.0 and type(cfg.rope_theta) is float
    assert cfg.activation == "gelu"
    assert base.n_layer == 2 and base.bias is True  # a copy: the original is unchanged

    train = apply_overrides(TrainConfig(), {"lr": "1e-3", "min_lr": "1e-5", "compile": "yes", "device": "cpu"})
    assert train.lr == 1e-3 and type(train.lr) is float and train.compile is True and train.device == "cpu"


def test_apply_overrides_rejects_unknown_key_by_name():
    with pytest.raises(ConfigError, match="n_layers"):
        apply_overrides(GPTConfig(), {"n_layers": "8"})
    with pytest.raises(ConfigError, match="learning_rate"):
        apply_overrides(TrainConfig(), {"learning_rate": "1e-3"})


@pytest.mark.parametrize("key, raw", [
    ("n_layer", "eight"), ("n_layer", "2.5"), ("bias", "maybe"), ("activation", "swish"), ("dropout", "lots"),
])
def test_apply_overrides_rejects_unparseable_value(key, raw):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(GPTConfig(), {key: raw})


def test_apply_overrides_runs_the_checks_again():
    with pytest.raises(ConfigError, match="n_layer"):
        apply_overrides(GPTConfig(), {"n_layer": "-1"})
    with pytest.raises(ConfigError, match="n_head"):
        apply_overrides(GPTConfig(n_embd=32, n_head=2), {"pos_encoding": "rope", "n_embd": "30"})


def test_parse_value_typed_toml_values():
    assert parse_value(GPTConfig, "dropout", 0) == 0.0 and type(parse_value(GPTConfig, "dropout", 0)) is float
    assert parse_value(GPTConfig, "n_layer", 4) == 4
    with pytest.raises(ConfigError, match="bias"):
        parse_value(GPTConfig, "bias", 1)  # TOML ints are not bools
    with pytest.raises(ConfigError, match="n_layer"):
        parse_value(GPTConfig, "n_layer", True)  # nor bools ints
    with pytest.raises(ConfigError, match="n_layer"):
        parse_value(GPTConfig, "n_layer", 2.5)


@pytest.mark.parametrize("raw, seconds", [("10m", 600.0), ("90", 90.0), ("90s", 90.0), ("1.5h", 5400.0), (" 2m ", 120.0)])
def test_max_time_parses_durations(raw, seconds):
    assert parse_value(TrainConfig, "max_time", raw) == seconds
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["ten minutes", "10d", "-5m", ""])
def test_bad_duration_names_max_time(raw):
    with pytest.raises(ConfigError, match="max_time"):
        parse_value(TrainConfig, "max_time", raw)


def test_parse_set_args():
    assert parse_set_args(["lr=3e-4", " n_layer = 8", "device=cuda:1"]) == {"lr": "3e-4", "n_layer": "8", "device": "cuda:1"}
    for bad in ("lr", "=3"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_set_args([bad])


# ---------------------------------------------------------------- TrainConfig checks

@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=0.0), "lr"),
    (dict(lr=1e-3, min_lr=2e-3), "min_lr"),
    (dict(min_lr=-1e-5), "min_lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=-2), "grad_accum"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(schedule="linear"), "schedule"),
    (dict(decay_frac=0.0), "decay_frac"),
    (dict(beta2=1.0), "beta2"),
    (dict(head_lr_scale=0.0), "head_lr_scale"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(max_time=-1.0), "max_time"),
    (dict(dtype="float8"), "dtype"),
    (dict(device="gpu"), "device"),
])
def test_bad_train_value_names_its_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)


def test_train_defaults_are_valid():
    cfg = TrainConfig()
    assert 0 < cfg.min_lr <= cfg.lr
    assert dataclasses.replace(cfg, device="cuda:0").device == "cuda:0"


# ---------------------------------------------------------------- TOML

def test_load_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[model]\npos_encoding = "rope"\n[train]\nlr = 3e-3\nmax_time = "10m"\n')
    data = load_toml(path)
    cfg = apply_overrides(GPTConfig.from_preset(data["preset"]), data["model"])
    train = apply_overrides(TrainConfig(), data["train"])
    assert cfg.pos_encoding == "rope" and train.lr == 3e-3 and train.max_time == 600.0

    (tmp_path / "bad.toml").write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optim"):
        load_toml(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("lr = \n")
    with pytest.raises(ConfigError, match="TOML"):
        load_toml(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")


# ---------------------------------------------------------------- closed-form sizes

def test_num_params_by_hand_tiny_untied_no_bias_qk_norm():
    cfg = GPTConfig.from_preset("tiny", tie_embeddings=False, bias=False, qk_norm=True)
    V, T, C, L, hs = 64, 32, 32, 2, 16
    block = (
        C + C                 # ln_1, ln_2 weights (no bias)
        + C * 3 * C + C * C   # c_attn, attn c_proj
        + hs + hs             # q_norm, k_norm weights, shared by the heads
        + C * 4 * C + 4 * C * C  # mlp c_fc, c_proj
    )
    total = V * C + T * C + L * block + C + V * C  # wte, wpe, blocks, ln_f, untied lm_head
    assert total == 29_920
    assert cfg.num_params() == total
    assert cfg.num_params(non_embedding=True) == total - V * C - T * C


def test_num_params_gpt2_124m_is_openais():
    cfg = GPTConfig.from_preset("gpt2-124m")
    assert cfg.num_params() == 124_439_808
    assert cfg.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_num_params_position_tables():
    learned = GPTConfig.from_preset("tiny")
    for enc in ("sinusoidal", "rope"):  # neither has a trained position parameter
        assert GPTConfig.from_preset("tiny", pos_encoding=enc).num_params() == learned.num_params() - 32 * 32


def test_flops_per_token():
    cfg = GPTConfig.from_preset("gpt2-124m")
    N = 85_056_000 + 50257 * 768  # non-embedding parameters + the (tied) output head
    assert cfg.flops_per_token() == 6 * N + 6 * 12 * 1024 * 768
    assert cfg.flops_per_token(seq_len=128) == 6 * N + 6 * 12 * 128 * 768
    # the head is multiplied once whether or not it shares the embedding's storage
    for name in PRESETS:
        tied = GPTConfig.from_preset(name, tie_embeddings=True)
        untied = GPTConfig.from_preset(name, tie_embeddings=False)
        assert tied.flops_per_token() == untied.flops_per_token(), name


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_config_files_resolve(path):
    """Every config the README names loads into valid configs (a typo there would surface only on a GPU)."""
    data = load_toml(path)
    name, model, train = resolve_configs(config_file=path)
    assert name == data["preset"]
    for key, value in data.get("model", {}).items():
        assert getattr(model, key) == value, key
    for key, value in data.get("train", {}).items():
        assert getattr(train, key) == value, key
