"""`gpt-small <verb>`: a thin shell over the Python API.

Each verb is a pair: `_args_<verb>(parser)` declares its flags, `_run_<verb>(args)` calls the API.
The table `VERBS` maps names to the pair. A `GPTSmallError` from anywhere becomes one line on
stderr and exit code 2; Ctrl-C becomes exit 130 (training saves a checkpoint before that).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from . import __version__
from .errors import GPTSmallError


# ---------------------------------------------------------------- info

def _args_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small-150m", help="preset name (default: small-150m)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--pos", dest="pos_encoding", help="positional encoding: learned, sinusoidal, rope")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any GPTConfig field")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_info(args: argparse.Namespace) -> None:
    from .config import GPTConfig, apply_overrides, parse_set_args

    overrides = parse_set_args(args.set)
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if args.pos_encoding:
        overrides["pos_encoding"] = args.pos_encoding
    cfg = apply_overrides(GPTConfig.from_preset(args.preset), overrides)
    info = {
        "preset": args.preset,
        "config": cfg.to_dict(),
        "params": cfg.num_params(),
        "non_embedding_params": cfg.num_params(non_embedding=True),
        "train_flops_per_token": cfg.flops_per_token(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"preset {args.preset}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<15} {v}")
    print(f"parameters              {info['params']:,}")
    print(f"non-embedding params    {info['non_embedding_params']:,}")
    print(f"training FLOPs / token  {info['train_flops_per_token']:,}  (6N + 6*n_layer*block_size*n_embd)")


# ---------------------------------------------------------------- prepare

def _args_prepare(p: argparse.ArgumentParser) -> None:
    # exactly one of --corpus / --text: checked by prepare(), so the error is the usual one line
    p.add_argument("--corpus", help="built-in corpus: eng-poem (20 MB) or gutenberg-poetry (122 MB)")
    p.add_argument("--text", help="a UTF-8 text file, or a folder of .txt files")
    p.add_argument("--tokenizer", default="char", help="char, bpe or gpt2 (default: char)")
    p.add_argument("--vocab-size", type=int, help="bpe vocabulary size (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of lines kept for validation (default: 0.1)")
    p.add_argument("--out", help="output folder (default: data/<corpus or text name>-<tokenizer>)")
    p.add_argument("--force", action="store_true", help="replace an --out folder that already holds prepared data")


def _run_prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .data import prepare

    name = args.corpus or (Path(args.text).stem if args.text else "")
    out = Path(args.out or f"data/{name}-{args.tokenizer}")
    m = prepare(out=out, corpus=args.corpus, text=args.text, tokenizer=args.tokenizer,
                vocab_size=args.vocab_size, val_fraction=args.val_fraction, force=args.force)
    print(f"prepared {out}  from {m['source']} ({m['source_bytes']:,} bytes, {m['source_lines']:,} lines)")
    print(f"  tokenizer {m['tokenizer']}, vocab {m['vocab_size']:,}, {m['dtype']}")
    print(f"  tokens    train {m['train_tokens']:,}  val {m['val_tokens']:,}")
    print(f"  chars/token val {m['val_chars_per_token']:.3f}  train {m['train_chars_per_token']:.3f}"
          + (f"  ({m['val_unknown_chars']} unknown chars in val)" if m["val_unknown_chars"] else ""))
    print(f"  {m['seconds']:.1f} s")


# ---------------------------------------------------------------- train

# flag -> (config section, field); each flag's type and check come from the dataclass field.
TRAIN_FLAGS = {
    "--batch-size": ("train", "batch_size"), "--grad-accum": ("train", "grad_accum"), "--lr": ("train", "lr"),
    "--min-lr": ("train", "min_lr"), "--warmup-steps": ("train", "warmup_steps"),
    "--schedule": ("train", "schedule"), "--weight-decay": ("train", "weight_decay"),
    "--grad-clip": ("train", "grad_clip"), "--max-steps": ("train", "max_steps"),
    "--max-time": ("train", "max_time"), "--eval-interval": ("train", "eval_interval"),
    "--eval-batches": ("train", "eval_batches"), "--log-interval": ("train", "log_interval"),
    "--checkpoint-interval": ("train", "checkpoint_interval"), "--seed": ("train", "seed"),
    "--device": ("train", "device"), "--dtype": ("train", "dtype"), "--threads": ("train", "threads"),
    "--block-size": ("model", "block_size"), "--n-layer": ("model", "n_layer"), "--n-head": ("model", "n_head"),
    "--n-embd": ("model", "n_embd"), "--dropout": ("model", "dropout"), "--pos": ("model", "pos_encoding"),
    "--activation": ("model", "activation"),
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (default: the config file's, else poem-cpu)")
    p.add_argument("--config", help="TOML file with preset, [model] and [train] tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any GPTConfig or TrainConfig field, e.g. --set lr=3e-4 --set model.qk_norm=true")
    for flag, (section, name) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=f"{section}__{name}", metavar=name.upper(), help=f"{section} config {name}")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")


def _configs_from_args(args: argparse.Namespace, **model_extra):
    from .config import resolve_configs

    model_kv, train_kv = dict(model_extra), {}
    for section, name in TRAIN_FLAGS.values():
        value = getattr(args, f"{section}__{name}")
        if value is not None:
            (model_kv if section == "model" else train_kv)[name] = value
    if args.compile:
        train_kv["compile"] = True
    return resolve_configs(preset=args.preset, config_file=args.config, model_overrides=model_kv,
                           train_overrides=train_kv, sets=args.set)


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder made by `gpt-small prepare`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)


def _run_train(args: argparse.Namespace) -> int:
    from .data import PreparedData
    from .distributed import print0, teardown_distributed
    from .train import Trainer, format_summary

    data = PreparedData(args.data)
    _, model_cfg, train_cfg = _configs_from_args(args, vocab_size=data.tokenizer.vocab_size)
    trainer = Trainer(model_cfg, train_cfg, data, args.out, resume=args.resume, show_progress=not args.no_progress)
    try:
        summary = trainer.fit()
        print0(format_summary(summary))
        if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
            print0(f"interrupted by {summary['stopped_by']}; continue with: gpt-small train --data {args.data} "
                   f"--out {args.out} --resume")
            return 130
        return 0
    finally:
        teardown_distributed()


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("show a preset's configuration, parameter count and FLOPs per token", _args_info, _run_info),
    "train": ("train a model on prepared data (resumable, kill-safe checkpoints)", _args_train, _run_train),
    "prepare": ("tokenize a built-in corpus or your text into train/val token files", _args_prepare, _run_prepare),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-small", description="Train, evaluate and sample GPT models.")
    parser.add_argument("--version", action="version", version=f"gpt-small {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (helptext, add_args, _) in VERBS.items():
        add_args(sub.add_parser(name, help=helptext, description=helptext))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return VERBS[args.verb][2](args) or 0
    except GPTSmallError as e:
        print(f"gpt-small {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt-small {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt-small generate | head`
        return 0
