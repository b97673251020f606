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


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("show a preset's configuration, parameter count and FLOPs per token", _args_info, _run_info),
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
        VERBS[args.verb][2](args)
    except GPTSmallError as e:
        print(f"gpt-small {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt-small {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt-small generate | head`
        return 0
    return 0
