"""What a training run is: `plan_run(...)` resolves a fresh run, a `--resume` and an `--init-from`
into one frozen `RunPlan` (configs, data, run folder, the checkpoint it starts from).

Every way of starting a run comes here: `gpt-small train` (flags, `--set`, a TOML file, a preset),
`make poem` (its TOML file and time budget), the Python API (`Trainer(model_config, train_config,
...)` passes its configs as they are) and `compare` (a Trainer per encoding). Each source becomes
a list of `Assignment`s (config_sources.py), read once: the TOML file once, the checkpoint's config.json
once. This module is the one place that says what a run may change of what it continues from:

- a resumed run keeps its model, data and optimizer state, so it keeps every field whose change
  would touch a weight, the data or the schedule's shape that the saved optimizer depends on; the
  fields marked `resume=True` in config.py (budgets, intervals, threads, device) may change;
- a fine-tuning run (`--init-from`) takes the weights, so it keeps the model's shape; only the
  fields in `INIT_MAY_CHANGE` (training behaviour, not shape) may differ; the rest of it is a
  new run: fresh step, optimizer, schedule and data position.

Any other change is refused in one line of one wording: which flag (or which config), which
field, the old value and the new one. The checks that need the run folder's lock (a fresh run in
a folder that already holds one) are made by `RunFolder.claim` once the lock is held.

The flag and TOML layer stays argparse plus config_sources.py's `Assignment`s rather than jsonargparse or
tyro: flags are derived from the dataclass fields already (help, unit, default, `may change at
--resume`), errors must be one line with exit code 2 (both libraries print a usage block), and
`--resume` needs to know which source set which field to name it in a refusal, which neither
library reports. A new dependency would replace ~60 lines and not remove this module's rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from . import limits
from .checkpoint import checkpoint_model_config, find_checkpoint, read_checkpoint_config
from .config import DEFAULT_PRESET, ConfigError, GPTConfig, TrainConfig, from_dict, parse_value
from .config_sources import Assignment, apply_assignments, user_assignments
from .data import PreparedData
from .errors import GPTSmallError
from .tokenizer import Tokenizer, load_tokenizer, same_tokenizer

RunKind = Literal["fresh", "resume", "init"]
# Resume: the fields that change no weight, no data and no schedule shape the saved optimizer state depends on.
RESUME_MAY_CHANGE = tuple(sorted(f.name for cls in (GPTConfig, TrainConfig) for f in fields(cls)
                                 if f.metadata.get("resume")))
INIT_MAY_CHANGE = ("dropout",)  # --init-from: model fields that are training behaviour, not shape


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """A run, resolved: what trains, on what, into which folder, starting from which checkpoint."""

    kind: RunKind
    out: Path  # the run folder
    data: PreparedData
    model: GPTConfig
    train: TrainConfig
    checkpoint: Path | None = None  # resume: the `last` checkpoint; init: the checkpoint whose weights start it

    @property
    def resume_from(self) -> Path | None:
        return self.checkpoint if self.kind == "resume" else None

    @property
    def init_from(self) -> Path | None:
        return self.checkpoint if self.kind == "init" else None


def plan_run(out: str | Path, *, data: PreparedData | str | Path | None = None, resume: bool = False,
             init_from: str | Path | None = None, preset: str | None = None, config_file: str | Path | None = None,
             sets: list[str] | None = None, flags: list[Assignment] | None = None,
             train_overrides: dict[str, Any] | None = None,
             model: GPTConfig | None = None, train: TrainConfig | None = None) -> RunPlan:
    """The run in `out`, from the user's sources, lowest priority first: preset < config file <
    train_overrides < flags < sets. `model`/`train` (the Python API) are whole configs instead.

    resume: continue the run in `out` (its data folder unless `data` is given, its configs with
    the allowed changes). init_from: a run folder (its best checkpoint) or checkpoint folder whose
    weights start a new run.
    """
    out = Path(out)
    if resume and init_from is not None:
        raise GPTSmallError("--init-from starts a new run; leave it out with --resume (the run holds its weights)")
    if init_from is not None and preset:
        raise GPTSmallError("--preset does not apply with --init-from: the model comes from the checkpoint")
    prepared = None
    if not resume:
        if data is None:
            raise GPTSmallError("--data is required (the folder made by `gpt-small prepare`)")
        prepared = data if isinstance(data, PreparedData) else PreparedData(data)
    # a fresh run's vocabulary is the data's (unless a flag or --set says otherwise)
    vocab = {"vocab_size": prepared.tokenizer.vocab_size} if prepared is not None and init_from is None and model is None else None
    file_preset, given = user_assignments(config_file=config_file, model_overrides=vocab,
                                          train_overrides=train_overrides, flags=flags, sets=sets)
    if model is not None or train is not None:  # whole configs: every field is stated
        given += _config_assignments("model", model or GPTConfig()) + _config_assignments("train", train or TrainConfig())
    if resume:
        plan = _plan_resume(out, data, preset, given)
    elif init_from is not None:
        plan = _plan_init(out, prepared, Path(init_from), given)
    else:
        model_cfg, train_cfg = apply_assignments(GPTConfig.from_preset(preset or file_preset or DEFAULT_PRESET),
                                                 TrainConfig(), given)
        plan = RunPlan(kind="fresh", out=out, data=prepared, model=model_cfg, train=train_cfg)
    _check_startable(plan)
    return plan


def _config_assignments(section: Literal["model", "train"], cfg: GPTConfig | TrainConfig) -> list[Assignment]:
    return [Assignment(f"the given {type(cfg).__name__}", section, k, v) for k, v in cfg.to_dict().items()]


def _refuse(verb: str, a: Assignment, old: Any, new: Any, whose: str, keeps: str, allowed: tuple[str, ...],
            remedy: str) -> ConfigError:
    """The one wording of a refused change."""
    return ConfigError(f"{verb}: {a.source} would change {a.name} from {old!r} ({whose}) to {new!r}; {keeps}; "
                       f"only {', '.join(allowed)} may change ({remedy})")


def _changed(a: Assignment, model: GPTConfig, train: TrainConfig) -> tuple[bool, Any, Any]:
    cfg = model if a.section == "model" else train
    old = getattr(cfg, a.name, None)
    new = parse_value(type(cfg), a.name, a.value)
    return new != old, old, new


def recorded_path(path: str | Path) -> Path:
    """The form a run records a folder in (run_config.json, the checkpoint's config): `..`, `.` and
    doubled slashes folded away where that names the same folder (`data/../data/x` -> `data/x`), so
    the record reads as the user would type it and compares equal with what `--resume` compares
    (the resolved path); relative stays relative, absolute stays absolute. Where folding would
    name another folder (a `..` after a symbolic link), the resolved path."""
    path = Path(path)
    tidy = Path(os.path.normpath(path))
    return tidy if tidy.resolve() == path.resolve() else path.resolve()


# ---------------------------------------------------------------- --resume

def _plan_resume(out: Path, data: PreparedData | str | Path | None, preset: str | None,
                 given: list[Assignment]) -> RunPlan:
    """The saved configs with only `RESUME_MAY_CHANGE` fields changed. A config file's `preset` key
    is not applied (the saved config holds the preset's values already); an explicit --preset is,
    and is refused where it differs from the run."""
    if not (out / "last").exists():
        raise GPTSmallError(f"--resume: {out} holds no checkpoint to resume (no {out / 'last'}); "
                            "train without --resume to start a run there")
    ckpt = find_checkpoint(out, prefer="last")
    meta = read_checkpoint_config(ckpt)
    prepared = _resume_data(ckpt, meta, data)
    try:
        model = checkpoint_model_config(ckpt, meta)
        known = {f.name for f in fields(TrainConfig)}  # a field of another version is dropped, not fatal
        train = from_dict(TrainConfig, {k: v for k, v in meta["train"].items() if k in known})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"the run's saved config is incomplete or damaged ({e}); start a new run") from None
    if preset:
        given = [Assignment(f"--preset {preset}", "model", k, v)
                 for k, v in GPTConfig.from_preset(preset).to_dict().items() if k != "vocab_size"] + given
    for a in given:
        changed, old, new = _changed(a, model, train)
        if changed and a.name not in RESUME_MAY_CHANGE:
            raise _refuse("--resume", a, old, new, "the run's", "a resumed run keeps its model, data and optimizer",
                          RESUME_MAY_CHANGE, "start a new run with another --out to change it")
    model, train = apply_assignments(model, train, given)
    return RunPlan(kind="resume", out=out, data=prepared, model=model, train=train, checkpoint=ckpt)


def _resume_data(ckpt: Path, meta: dict[str, Any], data: PreparedData | str | Path | None) -> PreparedData:
    """The run's own data folder; another one only where the run's is gone (moved) and the
    tokenizer is the same."""
    saved_entry = meta.get("data")
    directory = saved_entry.get("directory") if isinstance(saved_entry, dict) else None
    saved = Path(directory) if directory else None
    what = "--data" if data is not None else "the run's data"
    if data is None:
        if saved is None:
            raise GPTSmallError("--resume: the run records no data folder; pass --data with the folder "
                                "it was prepared into")
        if not saved.is_dir():
            raise GPTSmallError(f"--resume: the run's data folder {saved} is gone; pass --data with the folder "
                                "it was prepared into")
        data = saved
    prepared = data if isinstance(data, PreparedData) else PreparedData(data)
    if not same_tokenizer(load_tokenizer(ckpt), prepared.tokenizer):
        raise GPTSmallError(f"--resume: {what} {prepared.directory} was prepared with another tokenizer "
                            f"({prepared.tokenizer.kind}, vocab {prepared.tokenizer.vocab_size}) than the checkpoint "
                            f"{ckpt}; resume on the run's data or start a new run")
    if saved is not None and saved.is_dir() and prepared.directory.resolve() != saved.resolve():
        raise GPTSmallError(f"--resume: --data would change the data from {saved} (the run's) to "
                            f"{prepared.directory}; leave --data out to continue on {saved}, or start a new run")
    return prepared


# ---------------------------------------------------------------- --init-from

def _describe(tok: Tokenizer) -> str:
    return f"the {tok.kind} tokenizer ({tok.vocab_size:,} tokens)"


def _plan_init(out: Path, data: PreparedData, init_from: Path, given: list[Assignment]) -> RunPlan:
    """Full fine-tuning: the checkpoint's model (flags may repeat its shape, not change it), a new
    training config; the data must be prepared with the checkpoint's tokenizer."""
    from .checkpoint import checkpoint_model_config

    ckpt = find_checkpoint(init_from, prefer="best")
    model = checkpoint_model_config(ckpt)
    ckpt_tok = load_tokenizer(ckpt)
    if not same_tokenizer(ckpt_tok, data.tokenizer):
        raise GPTSmallError(f"--init-from: the data in {data.directory} was prepared with {_describe(data.tokenizer)}, "
                            f"the checkpoint {ckpt} uses {_describe(ckpt_tok)}; prepare the data with --tokenizer "
                            f"{ckpt_tok.kind}" + (" and the same vocabulary" if ckpt_tok.kind != "gpt2" else ""))
    for a in given:
        if a.section == "model":
            changed, old, new = _changed(a, model, TrainConfig())
            if changed and a.name not in INIT_MAY_CHANGE:
                raise _refuse("--init-from", a, old, new, f"the checkpoint's, {ckpt}",
                              "a fine-tuning run takes the model's shape from its checkpoint", INIT_MAY_CHANGE,
                              "train without --init-from for another shape")
    model, train = apply_assignments(model, TrainConfig(), given)
    return RunPlan(kind="init", out=out, data=data, model=model, train=train, checkpoint=ckpt)


# ---------------------------------------------------------------- every run

def _check_startable(plan: RunPlan) -> None:
    """Refuse a run that cannot start: no way to end, another vocabulary, data too short for one window."""
    model, train, data = plan.model, plan.train, plan.data
    if not (train.max_steps or train.max_time):
        raise GPTSmallError("max_steps 0 (no step limit) needs a max_time (--max-time) to end the run")
    if model.vocab_size != data.tokenizer.vocab_size:
        raise GPTSmallError(f"the model's vocab_size {model.vocab_size} differs from the data's "
                            f"tokenizer ({data.tokenizer.vocab_size})")
    for split, arr in (("train", data.train), ("validation", data.val)):
        if len(arr) < model.block_size + 1:
            raise GPTSmallError(f"the {split} split has {len(arr)} tokens, fewer than one window of "
                                f"block_size + 1 = {model.block_size + 1}; use a smaller block_size or more text")
    _check_fits(model, train)


def _check_fits(model: GPTConfig, train: TrainConfig) -> None:
    """Refuse a model and batch that cannot fit in this machine's memory before building anything
    (on a GPU the device's own memory bounds it further; torch reports that one itself)."""
    need = limits.model_bytes(model.num_params(), training=True) + limits.activation_bytes(
        batch_size=train.batch_size, block_size=model.block_size, n_layer=model.n_layer, n_embd=model.n_embd,
        mlp_ratio=model.mlp_ratio, vocab_size=model.vocab_size)
    limits.check_fits(need, f"training a model of {model.num_params():,} parameters at batch_size "
                            f"{train.batch_size} x block_size {model.block_size}")
