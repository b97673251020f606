"""What `train --resume` continues: the run's own data folder, model and training config.

A run folder's last checkpoint holds the resolved configs (`config.json`: model, train, data). A
resumed run takes them from there, so the `continue with:` line that an interrupted `train` prints
works as written. Flags given at resume may change only the fields marked `resume=True` in
config.py (budgets, intervals, threads, device); `resume_configs` refuses any other change in one
line naming the flag and both values. Another data folder is refused too, by what differs: its
tokenizer ("tokenizer"), or, where the tokenizer is the same, its path (a moved folder, whose old
path is gone, is accepted).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from .checkpoint import find_checkpoint, read_checkpoint_config
from .config import (Assignment, ConfigError, GPTConfig, TrainConfig, apply_assignments, file_assignments,
                     parse_value, set_assignments)
from .errors import GPTSmallError


def resume_plan(out: str | Path, *, data: str | Path | None = None, preset: str | None = None,
                config_file: str | Path | None = None, sets: list[str] | None = None,
                flags: list[Assignment] | None = None) -> tuple[Path, GPTConfig, TrainConfig]:
    """(data folder, model config, train config) of the run in `out`, with the allowed changes applied."""
    out = Path(out)
    if not (out / "last").exists():
        raise GPTSmallError(f"--resume: {out} holds no checkpoint to resume (no {out / 'last'}); "
                            "train without --resume to start a run there")
    ckpt = find_checkpoint(out, prefer="last")
    meta = read_checkpoint_config(ckpt)
    saved_data = _saved_data_dir(meta)
    data_dir = Path(data) if data is not None else saved_data
    if data is None and (saved_data is None or not saved_data.is_dir()):
        raise GPTSmallError(f"--resume: the run's data folder {saved_data} is gone; pass --data with the folder "
                            "it was prepared into")
    if data is not None and saved_data is not None and data_dir.resolve() != saved_data.resolve():
        _check_other_data(ckpt, data_dir, saved_data)
    model_cfg, train_cfg = resume_configs(meta, preset=preset, config_file=config_file, sets=sets, flags=flags)
    return data_dir, model_cfg, train_cfg


def _saved_data_dir(meta: dict[str, Any]) -> Path | None:
    data = meta.get("data")
    directory = data.get("directory") if isinstance(data, dict) else None
    return Path(directory) if directory else None


def _check_other_data(ckpt: Path, data_dir: Path, saved: Path) -> None:
    from .data import PreparedData
    from .tokenizer import load_tokenizer, same_tokenizer

    prepared = PreparedData(data_dir)
    if not same_tokenizer(load_tokenizer(ckpt), prepared.tokenizer):
        raise GPTSmallError(f"--resume: --data {data_dir} was prepared with another tokenizer "
                            f"({prepared.tokenizer.kind}, vocab {prepared.tokenizer.vocab_size}) than the run's "
                            f"data {saved}; resume on the run's data or start a new run")
    if saved.is_dir():
        raise GPTSmallError(f"--resume: --data would change the data from {saved} (the run's) to {data_dir}; "
                            f"leave --data out to continue on {saved}, or start a new run")


def resume_configs(saved: dict[str, Any], *, preset: str | None = None, config_file: str | Path | None = None,
                   sets: list[str] | None = None,
                   flags: list[Assignment] | None = None) -> tuple[GPTConfig, TrainConfig]:
    """The configs of a resumed run: the saved ones, with only `resume=True` fields changed by the
    user. Any other change is refused in one line naming the flag and both values. A config file's
    `preset` key is not applied (the saved config already holds the preset's values); an explicit
    --preset is, and is refused where it differs from the run."""
    try:
        model = GPTConfig.from_dict(saved["model"])
        known = {f.name for f in fields(TrainConfig)}  # a field of another version is dropped, not fatal
        train = TrainConfig(**{k: v for k, v in saved["train"].items() if k in known})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"the run's saved config is incomplete or damaged ({e}); start a new run") from None
    _, from_file = file_assignments(config_file)
    given = list(from_file)
    if preset:
        given += [Assignment(f"--preset {preset}", "model", k, v) for k, v in GPTConfig.from_preset(preset).to_dict().items()
                  if k != "vocab_size"]
    given += list(flags or []) + set_assignments(sets)
    resumable = {f.name for cls in (GPTConfig, TrainConfig) for f in fields(cls) if f.metadata.get("resume")}
    for a in given:
        old = getattr(model if a.section == "model" else train, a.name, None)
        new = parse_value(GPTConfig if a.section == "model" else TrainConfig, a.name, a.value)
        if new != old and a.name not in resumable:
            raise ConfigError(f"--resume: {a.source} would change {a.name} from {old!r} (the run's) to {new!r}; a "
                              f"resumed run keeps its model, data and optimizer; only {', '.join(sorted(resumable))} "
                              "may change (start a new run with another --out to change it)")
    return apply_assignments(model, train, given)
