"""The verbs that build a model from the config flags: `info`, `train`, `poem` and `compare`.

The train/model flags are derived from the config dataclasses (`config_sources.config_flags`), so
`--help` shows each field's meaning, unit and default from one place; their values stay strings
until config.parse_value reads them by the field's type. `train` hands them to `run.plan_run`,
which alone decides a fresh run, a resume or a fine-tune and what each may change.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal

from .config import GPTConfig, TrainConfig
from .config_sources import Assignment, config_flags, flag_help, resolve_configs
from .errors import GPTSmallError


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """--preset, --config, --set, and one flag per GPTConfig/TrainConfig field (config_sources.config_flags)."""
    p.add_argument("--preset", help="model preset (default: the config file's, else poem-cpu)")
    p.add_argument("--config", help="TOML file with preset, [model] and [train] tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any GPTConfig or TrainConfig field, e.g. --set lr=3e-4 --set model.qk_norm=true")
    model = p.add_argument_group("model flags (GPTConfig)", "defaults are GPTConfig's; a preset sets some of them")
    train = p.add_argument_group("training flags (TrainConfig)")
    for flag, (section, f) in config_flags().items():
        group = model if section == "model" else train
        # values stay strings here: config.parse_value parses them by the field's type, with the
        # same rule and message as --set and TOML. A bool flag alone means true (--compile).
        metavar = {"int": "N", "float": "X", "bool": "BOOL"}.get(str(f.type), "NAME")
        extra = dict(nargs="?", const="true") if metavar == "BOOL" else {}
        group.add_argument(flag, dest=f"{section}__{f.name}", metavar=metavar, help=flag_help(f), **extra)


def flag_assignments(args: argparse.Namespace) -> list[Assignment]:
    """The config flags given on the command line, as assignments (flags left out are None)."""
    return [Assignment(flag, section, f.name, getattr(args, f"{section}__{f.name}"))
            for flag, (section, f) in config_flags().items()
            if getattr(args, f"{section}__{f.name}", None) is not None]


def configs_from_args(args: argparse.Namespace, **model_extra: object) -> tuple[str, GPTConfig, TrainConfig]:
    """(preset name, model config, train config) from the config flags, as `info` and `compare` build them."""
    return resolve_configs(preset=args.preset, config_file=args.config, model_overrides=model_extra,
                           sets=args.set, flags=flag_assignments(args))


def args_info(p: argparse.ArgumentParser) -> None:
    # The same config flags as train, resolved the same way, so `info` shows the model train would build.
    p.add_argument("--data", help="prepared data folder: take the vocabulary from it, as train does")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: --data's, else the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_flags(p)


def run_info(args: argparse.Namespace) -> None:
    extra = {}
    if args.data:
        from .data import PreparedData

        extra["vocab_size"] = PreparedData(args.data).vocab_size
    if args.vocab_size is not None:
        extra["vocab_size"] = args.vocab_size
    name, cfg, _ = configs_from_args(args, **extra)  # GPTConfig checks vocab_size with the rest
    info = {
        "preset": name,
        "config": cfg.to_dict(),
        "params": cfg.num_params(),
        "non_embedding_params": cfg.num_params(non_embedding=True),
        "train_flops_per_token": cfg.flops_per_token(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"preset {name}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<15} {v}")
    print(f"parameters              {info['params']:,}")
    print(f"non-embedding params    {info['non_embedding_params']:,}")
    print(f"training FLOPs / token  {info['train_flops_per_token']:,}  (6N + 6*n_layer*block_size*n_embd)")


def args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder made by `gpt-small prepare` (with --resume: default the run's)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "with its saved model and training config (flags may change only what can change mid-run)")
    p.add_argument("--init-from", metavar="RUN", help="start from this run's best (or this checkpoint's) weights: "
                   "a new run with a fresh step, optimizer and schedule; the model's shape is the checkpoint's")
    p.add_argument("--logger", help="also log to tensorboard (event files in --out) or wandb (offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)


def run_train(args: argparse.Namespace) -> int:
    from .device import configure_process
    from .distributed import print0, teardown_distributed
    from .loop import format_summary
    from .run import plan_run
    from .train import Trainer

    # fresh, --resume or --init-from: decided, and any change a resume or fine-tune may not make
    # refused, by plan_run alone
    plan = plan_run(args.out, data=args.data, resume=args.resume, init_from=args.init_from, preset=args.preset,
                    config_file=args.config, sets=args.set, flags=flag_assignments(args))
    trackers = []
    if args.logger:  # a tracker writes nothing before its first record, when the run's lock is held
        from .interop.trackers import make_tracker

        trackers.append(make_tracker(args.logger, args.out, train_chars_per_token=plan.data.chars_per_token("train"),
                                     config={"model": plan.model.to_dict(), "train": plan.train.to_dict(),
                                             "data": str(plan.data.directory), "init_from": args.init_from}))
    configure_process(device=plan.train.device, threads=plan.train.threads)
    trainer = Trainer.from_plan(plan, show_progress=not args.no_progress, trackers=trackers)
    ok = False
    try:
        with trainer:  # DDP's reducer goes before its process group, while Python is fully alive
            summary = trainer.fit()
        print0(format_summary(summary))
        interrupted = summary["stopped_by"] in ("SIGINT", "SIGTERM")
        if interrupted:
            print0(f"interrupted by {summary['stopped_by']}; continue with: gpt-small train --data "
                   f"{shlex.quote(str(plan.data.directory))} --out {shlex.quote(str(args.out))} --resume")
        ok = True
    finally:
        teardown_distributed(ok)
    if interrupted:
        return 128 + int(signal.Signals[summary["stopped_by"]])  # 130 for SIGINT, 143 for SIGTERM
    return 0


def args_poem(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/eng-poem-char", help="prepared data (made from eng-poem if missing)")
    p.add_argument("--out", help="run folder, reused or resumed if present (default: runs/poem-cpu, runs/poem-gpu on a GPU)")
    p.add_argument("--config", help="training config (default: configs/poem-cpu.toml, configs/poem-gpu.toml on a GPU)")
    p.add_argument("--minutes", type=float, help="training budget (default: 10 on a CPU, 3 on a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def run_poem(args: argparse.Namespace) -> None:
    from .poem import make_poem

    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        raise GPTSmallError(f"--minutes must be a positive number, got {args.minutes}")
    make_poem(data_dir=args.data, run_dir=args.out, config_file=args.config, minutes=args.minutes, sets=args.set)


_ALL_POS = "learned,sinusoidal,rope"


def args_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder made by `gpt-small prepare`")
    p.add_argument("--out", help="study folder (default: runs/compare-<timestamp>)")
    p.add_argument("--seeds", type=int, default=1, help="runs per encoding, seeds seed, seed+1, ... (default: 1)")
    p.add_argument("--extrapolation-tokens", type=int, help="validation tokens scored at 1x/2x/4x the context "
                   "(default: 16384)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(p)
    # --pos is the config flag reused: here it takes a comma-separated list
    p.set_defaults(model__pos_encoding=_ALL_POS)
    p.epilog = (f"--pos takes a comma-separated list here (default: {_ALL_POS}). --max-time is a budget per "
                "model; --max-steps compares equal work.")


def run_compare(args: argparse.Namespace) -> None:
    import time

    from .data import PreparedData
    from .device import configure_process
    from .study import EXTRAPOLATION_TOKENS, compare_encodings, format_results, parse_encodings

    encodings = parse_encodings(args.model__pos_encoding)
    args.model__pos_encoding = None  # the study sets it per run
    from . import limits

    limits.positive_int(args.seeds, "--seeds", limits.MAX_NUM_SAMPLES)
    limits.optional_positive_int(args.extrapolation_tokens, "--extrapolation-tokens")
    data = PreparedData(args.data)
    _, model_cfg, train_cfg = configs_from_args(args, vocab_size=data.tokenizer.vocab_size)
    configure_process(device=train_cfg.device, threads=train_cfg.threads)
    out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    results = compare_encodings(encodings, model_config=model_cfg, train_config=train_cfg, data=data, out_dir=out,
                                seeds=args.seeds, show_progress=not args.no_progress,
                                extrapolation_tokens=EXTRAPOLATION_TOKENS if args.extrapolation_tokens is None
                                else args.extrapolation_tokens)
    print(format_results(results))
