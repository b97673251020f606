"""`gpt-small <verb>`: a thin shell over the Python API.

Each verb is a pair: `args_<verb>(parser)` declares its flags, `run_<verb>(args)` calls the API
(underscored where the pair lives here). The table `VERBS` maps names to the pair. The verbs that
build a model from the config flags (info, train, poem, compare) live in cli_train.py, `generate`
in cli_generate.py, the others here. A `GPTSmallError` from anywhere, an OS error (full disk,
read-only folder) and a bad flag alike become one line on stderr and exit code 2; Ctrl-C becomes
exit 130 and SIGTERM 143 (training saves a checkpoint before either).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, NoReturn

from . import __version__, limits
from .cli_generate import WEIGHTS_HELP, WINDOW_KEEP_HELP, args_generate, run_generate
from .cli_train import (args_compare, args_info, args_poem, args_train, run_compare, run_info, run_poem,
                        run_train)
from .errors import GPTSmallError


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
    if args.vocab_size is not None and m["vocab_size"] != args.vocab_size:
        print(f"note: --vocab-size {args.vocab_size} asked for, the {args.tokenizer} tokenizer of this text has "
              f"{m['vocab_size']} tokens (all the merges the training text allows)", file=sys.stderr)


# ---------------------------------------------------------------- eval

def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    # exactly one source: checked by evaluate_checkpoint, so the error is the usual one line
    p.add_argument("--text", help="a UTF-8 text file (or folder of .txt files), encoded with the checkpoint's tokenizer")
    p.add_argument("--corpus", help="a built-in corpus: eng-poem or gutenberg-poetry")
    p.add_argument("--data", help="prepared data folder (same tokenizer as the checkpoint)")
    p.add_argument("--split", default="val", help="with --data: val (default) or train")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's block_size; longer = "
                   "length extrapolation, sinusoidal and rope only)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: context // 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    p.add_argument("--dtype", default="float32", help="float32 (default, exact) or bfloat16/float16 autocast")
    p.add_argument("--weights", default="float32", help=WEIGHTS_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_eval(args: argparse.Namespace) -> None:
    from .config import check_threads
    from .device import set_threads
    from .evaluate import evaluate_checkpoint, format_eval

    from . import limits

    set_threads(check_threads(args.threads))  # evaluate_checkpoint checks the rest before any work
    limits.positive_int(args.batch_size, "--batch-size", limits.MAX_BATCH_SIZE)
    limits.optional_positive_int(args.context, "--context", limits.MAX_BLOCK_SIZE)
    limits.optional_positive_int(args.stride, "--stride", limits.MAX_BLOCK_SIZE)
    result = evaluate_checkpoint(args.checkpoint, text=args.text, corpus=args.corpus, data=args.data,
                                 split=args.split, context=args.context, stride=args.stride,
                                 batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                 weights=args.weights)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_eval(result))


# ---------------------------------------------------------------- serve

def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; others need an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=limits.DEFAULT_SERVE_BATCH,
                   help=f"sequences decoded together (default: {limits.DEFAULT_SERVE_BATCH}, measured: docs/serve.md)")
    p.add_argument("--prefill-batch", type=int, default=limits.DEFAULT_PREFILL_BATCH,
                   help=f"arrivals prefilled together in one forward pass (default: {limits.DEFAULT_PREFILL_BATCH}; "
                        "1 = one at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond that; then 429 (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=1000, help="most tokens one sample may ask for (default: 1000)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: env GPT_SMALL_API_KEY)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    p.add_argument("--weights", default="float32", help=WEIGHTS_HELP)
    p.add_argument("--window-keep", help=WINDOW_KEEP_HELP)


def _run_serve(args: argparse.Namespace) -> None:
    from . import limits

    limits.check_threads(args.threads, "--threads")
    limits.positive_int(args.max_batch, "--max-batch", limits.MAX_SERVE_BATCH)
    limits.positive_int(args.prefill_batch, "--prefill-batch", limits.MAX_SERVE_BATCH)
    limits.nonneg_int(args.max_queue, "--max-queue", limits.MAX_SERVE_QUEUE)
    limits.positive_int(args.max_new_tokens, "--max-new-tokens", limits.MAX_NEW_TOKENS)
    limits.nonneg_int(args.port, "--port", 65535)
    try:
        from .serve import serve
    except ImportError as e:
        raise GPTSmallError(f"gpt-small serve needs the serve extra ({e.name} is missing): "
                            "pip install 'gpt-small[serve]'") from None
    serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_new_tokens=args.max_new_tokens, api_key=args.api_key, threads=args.threads, weights=args.weights,
          window_keep=args.window_keep, prefill_batch=args.prefill_batch)


# ---------------------------------------------------------------- export and import (gpt_small/interop)

def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    p.add_argument("--out", required=True, help="new folder for transformers' from_pretrained")
    p.add_argument("--dtype", default="float32", help="weights as float32 (default) or bfloat16")
    p.add_argument("--no-eval", action="store_true", help="where the run recorded no whole-split figure for this "
                   "step, do not score the validation split for the model card")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for that scoring (default 0 = all cores)")
    p.add_argument("--target", default="transformers", help="runtime the folder is for: transformers (default), "
                   "vllm or llama.cpp (refuses, in one line, a model that runtime would compute differently)")


def _run_export(args: argparse.Namespace) -> None:
    from .device import set_threads
    from .interop.hf_export import ARCHITECTURES, export_checkpoint

    from . import limits

    set_threads(limits.check_threads(args.threads, "--threads"))
    r = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, evaluate=not args.no_eval, target=args.target)
    print(f"exported {args.checkpoint} to {r.out} as {ARCHITECTURES[r.architecture]}")
    print(f"  why: {r.reason}")


def _args_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="local transformers GPT2LMHeadModel folder")
    p.add_argument("--out", required=True, help="new run folder for the gpt-small checkpoint")


def _run_import(args: argparse.Namespace) -> None:
    from .interop.hf_import import import_gpt2

    r = import_gpt2(args.hf, args.out)
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    c = r.config
    print(f"imported {r.weights} to {r.out}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
          f"block {c.block_size}, {c.activation}, gpt2 tokenizer")


# ---------------------------------------------------------------- report

def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    p.add_argument("--samples", type=int, default=50, help="poems to sample and to compare (default: 50)")
    p.add_argument("--lines", type=int, default=14, help="lines per poem (default: 14)")
    p.add_argument("--out", help="folder for report.json/.md/.png (default: <run>/report)")
    p.add_argument("--data", help="prepared data (default: the run's, from run_config.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=limits.DEFAULT_TEMPERATURE)
    p.add_argument("--eval-tokens", type=int, help="score only the first N validation tokens (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--window-keep", help=WINDOW_KEEP_HELP)


def _run_report(args: argparse.Namespace) -> None:
    from .report import make_report, report_line

    r = make_report(args.checkpoint, samples=args.samples, out=args.out, data=args.data, lines=args.lines,
                    seed=args.seed, temperature=args.temperature, eval_tokens=args.eval_tokens, device=args.device,
                    window_keep=args.window_keep)
    print(report_line(r))
    print(f"wrote {r['out']}/report.json, report.md, report.png")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("show the model train would build: its configuration, parameters and FLOPs per token", args_info, run_info),
    "train": ("train a model on prepared data (resumable, kill-safe checkpoints)", args_train, run_train),
    "generate": ("write text with a trained model (KV cache, streaming)", args_generate, run_generate),
    "poem": ("the main job: prepare eng-poem, train (the CPU or GPU recipe), print three poems", args_poem, run_poem),
    "prepare": ("tokenize a built-in corpus or your text into train/val token files", _args_prepare, _run_prepare),
    "eval": ("loss, perplexity and bits/char of a checkpoint on a text or prepared split", _args_eval, _run_eval),
    "report": ("judge a model's poems against the corpus: copying, form, language, loss", _args_report,
               _run_report),
    "compare": ("train learned, sinusoidal and rope models side by side and compare them", args_compare,
                run_compare),
    "serve": ("serve a checkpoint: OpenAI-compatible HTTP API and a page for writing poems", _args_serve,
              _run_serve),
    "export": ("write a checkpoint as a Hugging Face transformers folder", _args_export, _run_export),
    "import": ("make a gpt-small checkpoint of a local Hugging Face GPT-2 folder", _args_import, _run_import),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (argparse prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt-small", description="Train, evaluate and sample GPT models.")
    parser.add_argument("--version", action="version", version=f"gpt-small {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)
    for name, (helptext, add_args, _) in VERBS.items():
        add_args(sub.add_parser(name, help=helptext, description=helptext))
    return parser


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--max-time -5m` -> `--max-time=-5m`: argparse takes a value that starts with '-' (and is not a
    plain negative number) for a flag, and fails with its usage block; joined, the value reaches the
    field's check, which names it."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if subs is None or verb not in subs.choices:
        return argv
    actions = subs.choices[verb]._option_string_actions
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        action = actions.get(a)
        if (action is not None and action.nargs is None and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1] not in actions and action.option_strings[0].startswith("--")):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from .fileio import reason

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_values(parser, argv))
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
    except OSError as e:  # a write path not wrapped yet, a file vanished mid-run: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"gpt-small {args.verb}: error: {where}{reason(e)}", file=sys.stderr)
        return 2
