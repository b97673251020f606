"""Where a config's values come from: a TOML file, the CLI's flags, `--set key=value`, a preset.

Each source becomes a list of `Assignment`s (which field, which value, and where it came from,
so a refusal can name the flag or the file line); `resolve_configs` applies them in priority
order, lowest first: preset < config file < overrides < flags < --set. The flags themselves are
derived from the dataclass fields (`config_flags`, `flag_help`), so each default and its
documentation stay in config.py. TOML files are read as data (tomllib), never executed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from .config import DEFAULT_PRESET, PRESETS, GPTConfig, TrainConfig, apply_overrides, field_types
from .errors import ConfigError


def parse_set_args(items: list[str]) -> dict[str, str]:
    """['lr=3e-4', 'model.n_layer=8'] -> {'lr': '3e-4', 'model.n_layer': '8'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file as data: {'preset': ..., 'model': {...}, 'train': {...}}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); TOML files are UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    unknown = set(data) - {"preset", "model", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; use preset, [model], [train]")
    if "preset" in data and (not isinstance(data["preset"], str) or data["preset"] not in PRESETS):
        raise ConfigError(f"{path}: preset must be one of {', '.join(PRESETS)}, got {data['preset']!r}")
    for section in ("model", "train"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: [{section}] must be a table of key = value, got {data[section]!r}")
    return data


@dataclass(frozen=True)
class Assignment:
    """One field set by the user: where it came from (for messages), which config, which field, the raw value."""

    source: str  # "--n-layer", "--set lr", "--config run.toml [model] n_layer"
    section: Literal["model", "train"]
    name: str
    value: Any


def config_flags() -> dict[str, tuple[str, dataclasses.Field]]:
    """flag -> (section, field) for every config field that has a flag, model fields first."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in (("model", GPTConfig), ("train", TrainConfig)):
        for f in fields(cls):
            flag = f.metadata.get("flag", "")
            if flag is not None:
                out[flag or "--" + f.name.replace("_", "-")] = (section, f)
    return out


def flag_help(f: dataclasses.Field) -> str:
    """'peak learning rate (default: 0.001)' / '... (steps; default: 5000; may change at --resume)'."""
    typ = field_types(GPTConfig if f.name in field_types(GPTConfig) else TrainConfig)[f.name]
    choices = f" [{', '.join(map(str, get_args(typ)))}]" if getattr(typ, "__origin__", None) is Literal else ""
    unit = f"{f.metadata['unit']}; " if f.metadata.get("unit") else ""
    extra = "; may change at --resume" if f.metadata.get("resume") else ""
    return f"{f.metadata['doc']}{choices} ({unit}default: {f.default}{extra})".replace("%", "%%")


def file_assignments(config_file: str | Path | None) -> tuple[str | None, list[Assignment]]:
    """A TOML file's preset name and its [model]/[train] entries as assignments."""
    if not config_file:
        return None, []
    file = load_toml(config_file)
    out = []
    for section in ("model", "train"):
        table = file.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{config_file}: [{section}] must be a table")
        out += [Assignment(f"--config {config_file} [{section}] {k}", section, k, v) for k, v in table.items()]
    return file.get("preset"), out


def set_assignments(sets: list[str] | None) -> list[Assignment]:
    """`--set` items as assignments: keys qualified (`model.n_layer`, `train.lr`) or bare (`lr`); a
    bare key goes to whichever config has that field."""
    model_fields = {f.name for f in fields(GPTConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    out = []
    for key, value in parse_set_args(sets or []).items():
        section, _, bare = key.rpartition(".")
        if section == "model" or (not section and bare in model_fields):
            out.append(Assignment(f"--set {key}", "model", bare, value))
        elif section == "train" or (not section and bare in train_fields):
            out.append(Assignment(f"--set {key}", "train", bare, value))
        else:
            raise ConfigError(f"unknown --set key {key!r}; keys are GPTConfig fields ({', '.join(sorted(model_fields))}) "
                              f"or TrainConfig fields ({', '.join(sorted(train_fields))})")
    return out


def apply_assignments(model: GPTConfig, train: TrainConfig,
                      assignments: list[Assignment]) -> tuple[GPTConfig, TrainConfig]:
    model_kv = {a.name: a.value for a in assignments if a.section == "model"}
    train_kv = {a.name: a.value for a in assignments if a.section == "train"}
    return apply_overrides(model, model_kv), apply_overrides(train, train_kv)


def user_assignments(*, config_file: str | Path | None = None, model_overrides: dict[str, Any] | None = None,
                     train_overrides: dict[str, Any] | None = None, flags: list[Assignment] | None = None,
                     sets: list[str] | None = None) -> tuple[str | None, list[Assignment]]:
    """(the config file's preset, every setting given) in priority order, lowest first: config file
    < overrides < flags < --set; applied in this order, a later assignment of a field wins."""
    file_preset, from_file = file_assignments(config_file)
    overrides = [Assignment(f"{section}.{k}={v!r}", section, k, v)
                 for section, kv in (("model", model_overrides), ("train", train_overrides)) for k, v in (kv or {}).items()]
    return file_preset, from_file + overrides + list(flags or []) + set_assignments(sets)


def resolve_configs(*, preset: str | None = None, config_file: str | Path | None = None,
                    model_overrides: dict[str, Any] | None = None, train_overrides: dict[str, Any] | None = None,
                    sets: list[str] | None = None,
                    flags: list[Assignment] | None = None) -> tuple[str, GPTConfig, TrainConfig]:
    """preset < config file < overrides and flags < --set. Returns (preset name, model config, train config)."""
    file_preset, given = user_assignments(config_file=config_file, model_overrides=model_overrides,
                                          train_overrides=train_overrides, flags=flags, sets=sets)
    name = preset or file_preset or DEFAULT_PRESET
    model, train = apply_assignments(GPTConfig.from_preset(name), TrainConfig(), given)
    return name, model, train
