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
    ok = False
    try:
        summary = trainer.fit()
        print0(format_summary(summary))
        interrupted = summary["stopped_by"] in ("SIGINT", "SIGTERM")
        if interrupted:
            print0(f"interrupted by {summary['stopped_by']}; continue with: gpt-small train --data {args.data} "
                   f"--out {args.out} --resume")
        ok = True
    finally:
        trainer.close()  # DDP's reducer goes before its process group, while Python is fully alive
        teardown_distributed(ok)
    return 130 if interrupted else 0


# ---------------------------------------------------------------- generate and poem

# --lines N without --max-new-tokens: room for N lines of a char model (eng-poem's lines average
# ~38 characters; 500 tokens cut a 12-line poem short).
_LINE_TOKENS = 200


def _args_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: start a new line)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"at most this many tokens per sample (default: {_LINE_TOKENS} per --lines line, else 500)")
    p.add_argument("--lines", type=int, help="stop after this many complete verse lines")
    p.add_argument("--stop", help="stop after this text")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    verse = p.add_argument_group("verse form (any of these writes a poem line by line: docs/poetry.md)")
    verse.add_argument("--rhyme", help="rhyme scheme: ABAB, AABB, ABBA, 'ABAB CDCD EFEF GG', or sonnet, quatrain, ...")
    verse.add_argument("--syllables", type=int, help="target syllables per line")
    verse.add_argument("--syllable-tolerance", type=int, default=1, help="allowed difference (default: 1)")
    verse.add_argument("--stanzas", type=int, help="stanzas, apart by blank lines (default: the scheme's)")
    verse.add_argument("--candidates", type=int, default=16, help="lines sampled per round (default: 16)")
    verse.add_argument("--budget", type=int, default=512, help="candidate lines per verse line at most (default: 512)")
    verse.add_argument("--form-meta", metavar="FILE", help="write the poem's metadata (JSON) here")


def _run_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .corpus import read_text_source
    from .device import pick_device
    from .generate import generate_text

    prompt = read_text_source(args.prompt_file) if args.prompt_file else args.prompt
    if args.rhyme or args.syllables or args.stanzas:
        from .forms import run_form_cli
        return run_form_cli(args, prompt)
    ckpt = load_checkpoint(args.checkpoint, device=pick_device(args.device))
    ckpt.tokenizer.encode(prompt, unknown="error")  # a bad prompt fails before anything is printed
    stream = None
    if args.num_samples == 1 and not args.no_stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        stream = lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = _LINE_TOKENS * args.lines if args.lines and args.lines > 0 else 500
    samples = generate_text(ckpt.model, ckpt.tokenizer, prompt, max_new_tokens=max_new,
                            lines=args.lines, stop=args.stop, num_samples=args.num_samples,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, stream=stream)
    if stream is not None:
        print()
    else:
        for i, text in enumerate(samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(text)
    for i, text in enumerate(samples):
        rest = text[len(prompt):]
        short = ((args.lines and rest.count("\n") < args.lines and f"its {args.lines} lines")
                 or (args.stop and args.stop not in rest and f"the stop text {args.stop!r}"))
        if short:
            which = f"sample {i + 1}" if args.num_samples > 1 else "the sample"
            print(f"note: {which} reached --max-new-tokens {max_new} before {short}; "
                  "pass a larger --max-new-tokens", file=sys.stderr)


def _args_poem(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/eng-poem-char", help="prepared data (made from eng-poem if missing)")
    p.add_argument("--out", default="runs/poem-cpu", help="run folder (reused or resumed if present)")
    p.add_argument("--config", default="configs/poem-cpu.toml", help="training config (TOML)")
    p.add_argument("--minutes", type=float, help="training budget (default: 10 on a CPU, 3 on a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def _run_poem(args: argparse.Namespace) -> None:
    from .poem import make_poem

    if args.minutes is not None and args.minutes <= 0:
        raise GPTSmallError(f"--minutes must be positive, got {args.minutes}")
    make_poem(data_dir=args.data, run_dir=args.out, config_file=args.config, minutes=args.minutes, sets=args.set)


# ---------------------------------------------------------------- eval and compare

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
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_eval(args: argparse.Namespace) -> None:
    from .device import set_threads
    from .evaluate import evaluate_checkpoint, format_eval

    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise GPTSmallError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    set_threads(args.threads)
    result = evaluate_checkpoint(args.checkpoint, text=args.text, corpus=args.corpus, data=args.data,
                                 split=args.split, context=args.context, stride=args.stride,
                                 batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_eval(result))


_ALL_POS = "learned,sinusoidal,rope"


def _args_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder made by `gpt-small prepare`")
    p.add_argument("--out", help="study folder (default: runs/compare-<timestamp>)")
    p.add_argument("--seeds", type=int, default=1, help="runs per encoding, seeds seed, seed+1, ... (default: 1)")
    p.add_argument("--extrapolation-tokens", type=int, help="validation tokens scored at 1x/2x/4x the context "
                   "(default: 16384)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p)
    # --pos is the config flag reused: here it takes a comma-separated list
    p.set_defaults(model__pos_encoding=_ALL_POS)
    p.epilog = (f"--pos takes a comma-separated list here (default: {_ALL_POS}). --max-time is a budget per "
                "model; --max-steps compares equal work.")


def _run_compare(args: argparse.Namespace) -> None:
    import time

    from .data import PreparedData
    from .study import EXTRAPOLATION_TOKENS, compare_encodings, format_results, parse_encodings

    encodings = parse_encodings(args.model__pos_encoding)
    args.model__pos_encoding = None  # the study sets it per run
    if args.seeds < 1:
        raise GPTSmallError(f"--seeds must be at least 1, got {args.seeds}")
    data = PreparedData(args.data)
    _, model_cfg, train_cfg = _configs_from_args(args, vocab_size=data.tokenizer.vocab_size)
    out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    results = compare_encodings(encodings, model_config=model_cfg, train_config=train_cfg, data=data, out_dir=out,
                                seeds=args.seeds, show_progress=not args.no_progress,
                                extrapolation_tokens=args.extrapolation_tokens or EXTRAPOLATION_TOKENS)
    print(format_results(results))


# ---------------------------------------------------------------- report

def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    p.add_argument("--samples", type=int, default=50, help="poems to sample and to compare (default: 50)")
    p.add_argument("--lines", type=int, default=14, help="lines per poem (default: 14)")
    p.add_argument("--out", help="folder for report.json/.md/.png (default: <run>/report)")
    p.add_argument("--data", help="prepared data (default: the run's, from run_config.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--eval-tokens", type=int, help="score only the first N validation tokens (default: all)")
    p.add_argument("--device", default="auto")


def _run_report(args: argparse.Namespace) -> None:
    from .report import make_report, report_line

    r = make_report(args.checkpoint, samples=args.samples, out=args.out, data=args.data, lines=args.lines,
                    seed=args.seed, temperature=args.temperature, eval_tokens=args.eval_tokens, device=args.device)
    print(report_line(r))
    print(f"wrote {r['out']}/report.json, report.md, report.png")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("show a preset's configuration, parameter count and FLOPs per token", _args_info, _run_info),
    "train": ("train a model on prepared data (resumable, kill-safe checkpoints)", _args_train, _run_train),
    "generate": ("write text with a trained model (KV cache, streaming)", _args_generate, _run_generate),
    "poem": ("the main job: prepare eng-poem, train the CPU preset, print three poems", _args_poem, _run_poem),
    "prepare": ("tokenize a built-in corpus or your text into train/val token files", _args_prepare, _run_prepare),
    "eval": ("loss, perplexity and bits/char of a checkpoint on a text or prepared split", _args_eval, _run_eval),
    "report": ("judge a model's poems against the corpus: copying, form, language, loss", _args_report,
               _run_report),
    "compare": ("train learned, sinusoidal and rope models side by side and compare them", _args_compare,
                _run_compare),
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
