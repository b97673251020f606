"""`gpt-small <verb>`: a thin shell over the Python API.

Each verb is a pair: `_args_<verb>(parser)` declares its flags, `_run_<verb>(args)` calls the API.
The table `VERBS` maps names to the pair. A `GPTSmallError` from anywhere, an OS error (full
disk, read-only folder) and a bad flag alike become one line on stderr and exit code 2; Ctrl-C
becomes exit 130 and SIGTERM 143 (training saves a checkpoint before either). The train/model flags
are derived from the config dataclasses (`config.config_flags`), so `--help` shows each field's
meaning, unit and default from one place; `train` hands them to `run.plan_run`, which alone decides
a fresh run, a resume or a fine-tune and what each may change.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from typing import Callable, NoReturn

from . import __version__, limits
from .config import LINE_TOKEN_BUDGET  # --lines N without --max-new-tokens: room for N lines
from .errors import GPTSmallError


# ---------------------------------------------------------------- info

def _args_info(p: argparse.ArgumentParser) -> None:
    # The same config flags as train, resolved the same way, so `info` shows the model train would build.
    p.add_argument("--data", help="prepared data folder: take the vocabulary from it, as train does")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: --data's, else the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_config_flags(p)


def _run_info(args: argparse.Namespace) -> None:
    extra = {}
    if args.data:
        from .data import PreparedData

        extra["vocab_size"] = PreparedData(args.data).vocab_size
    if args.vocab_size is not None:
        extra["vocab_size"] = args.vocab_size
    name, cfg, _ = _configs_from_args(args, **extra)  # GPTConfig checks vocab_size with the rest
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


# ---------------------------------------------------------------- train

def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """--preset, --config, --set, and one flag per GPTConfig/TrainConfig field (config.config_flags)."""
    from .config import config_flags, flag_help

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


def _flag_assignments(args: argparse.Namespace):
    from .config import Assignment, config_flags

    return [Assignment(flag, section, f.name, getattr(args, f"{section}__{f.name}"))
            for flag, (section, f) in config_flags().items()
            if getattr(args, f"{section}__{f.name}", None) is not None]


def _configs_from_args(args: argparse.Namespace, **model_extra):
    from .config import resolve_configs

    return resolve_configs(preset=args.preset, config_file=args.config, model_overrides=model_extra,
                           sets=args.set, flags=_flag_assignments(args))


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder made by `gpt-small prepare` (with --resume: default the run's)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "with its saved model and training config (flags may change only what can change mid-run)")
    p.add_argument("--init-from", metavar="RUN", help="start from this run's best (or this checkpoint's) weights: "
                   "a new run with a fresh step, optimizer and schedule; the model's shape is the checkpoint's")
    p.add_argument("--logger", help="also log to tensorboard (event files in --out) or wandb (offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)


def _run_train(args: argparse.Namespace) -> int:
    from .device import configure_process
    from .distributed import print0, teardown_distributed
    from .loop import format_summary
    from .run import plan_run
    from .train import Trainer

    # fresh, --resume or --init-from: decided, and any change a resume or fine-tune may not make
    # refused, by plan_run alone
    plan = plan_run(args.out, data=args.data, resume=args.resume, init_from=args.init_from, preset=args.preset,
                    config_file=args.config, sets=args.set, flags=_flag_assignments(args))
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


# ---------------------------------------------------------------- generate and poem



_WEIGHTS_HELP = ("float32 (default), bfloat16 or int8: the Linear weights' precision for inference, "
                 "converted at load (faster CPU decoding; docs/decoding.md)")


_WINDOW_KEEP_HELP = ("past the model's context, tokens of the full window kept and re-prefilled: half (default; "
                     "the context eval's default stride scores), slide (the exact per-token slide of older "
                     "versions) or a number (docs/decoding.md)")


def _args_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: start a new line)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"at most this many tokens per sample (default: {LINE_TOKEN_BUDGET} per --lines line, else 500)")
    p.add_argument("--lines", type=int, help="stop after this many complete verse lines")
    p.add_argument("--stop", help=f"stop after this text (at most {limits.MAX_STOP_CHARS} characters)")
    p.add_argument("--temperature", type=float, default=limits.DEFAULT_TEMPERATURE,
                   help=f"0 to {limits.MAX_TEMPERATURE:g} (default: {limits.DEFAULT_TEMPERATURE}); below "
                        f"{limits.TEMPERATURE_FLOOR:g}, 0 included, = greedy (the most likely token)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    p.add_argument("--weights", default="float32", help=_WEIGHTS_HELP)
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--window-keep", help=_WINDOW_KEEP_HELP)
    verse = p.add_argument_group("verse form (any of these writes a poem line by line: docs/poetry.md)")
    verse.add_argument("--rhyme", help="rhyme scheme: ABAB, AABB, ABBA, 'ABAB CDCD EFEF GG', or sonnet, quatrain, ...")
    verse.add_argument("--syllables", type=int, help="target syllables per line")
    verse.add_argument("--syllable-tolerance", type=int, help="allowed difference (default: 1)")
    verse.add_argument("--stanzas", type=int, help="stanzas, apart by blank lines (default: the scheme's)")
    verse.add_argument("--candidates", type=int, help="lines sampled per round (default: 16)")
    verse.add_argument("--budget", type=int, help="candidate lines per verse line at most (default: 512)")
    verse.add_argument("--form-meta", metavar="FILE", help="write the poem's metadata (JSON) here")


def _run_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .corpus import read_text_source
    from .device import pick_device
    from .generate import check_sampling_args, generate_text, window_keep
    from .ops.quantize import check_weights, convert_weights

    # Everything is checked before the first byte reaches stdout: a sample that starts and then
    # fails leaves the user a prompt and a traceback-free error, but a mixed stream.
    from . import limits

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    limits.optional_positive_int(args.max_new_tokens, "--max-new-tokens", limits.MAX_NEW_TOKENS)
    limits.optional_positive_int(args.lines, "--lines", limits.MAX_LINES)
    limits.positive_int(args.num_samples, "--num-samples", limits.MAX_NUM_SAMPLES)
    limits.check_seed(args.seed, "--seed")
    if args.stop is not None:
        limits.check_text(args.stop, "--stop", max_chars=limits.MAX_STOP_CHARS)
    check_weights(args.weights)
    device = pick_device(args.device)
    prompt = read_text_source(args.prompt_file) if args.prompt_file else args.prompt
    if args.rhyme is not None or args.syllables is not None or args.stanzas is not None:
        from .forms import run_form_cli
        return run_form_cli(args, prompt, device)
    # these only shape a verse form: alone they would be silently ignored
    for flag in ("syllable_tolerance", "candidates", "budget", "form_meta"):
        if getattr(args, flag) is not None:
            raise GPTSmallError(f"--{flag.replace('_', '-')} applies to verse forms only: add --rhyme, --syllables "
                                "or --stanzas")
    ckpt = load_checkpoint(args.checkpoint, device=device)
    convert_weights(ckpt.model, args.weights)
    window_keep(ckpt.model.config.block_size, args.window_keep)  # a bad value fails before any output
    ckpt.tokenizer.encode(prompt, unknown="error")  # a bad prompt fails before anything is printed
    stream = None
    if args.num_samples == 1 and not args.no_stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        stream = lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush())  # noqa: E731
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = LINE_TOKEN_BUDGET * args.lines if args.lines and args.lines > 0 else 500
    samples = generate_text(ckpt.model, ckpt.tokenizer, prompt, max_new_tokens=max_new,
                            lines=args.lines, stop=args.stop, num_samples=args.num_samples,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, stream=stream,
                            keep=args.window_keep)
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
    p.add_argument("--out", help="run folder, reused or resumed if present (default: runs/poem-cpu, runs/poem-gpu on a GPU)")
    p.add_argument("--config", help="training config (default: configs/poem-cpu.toml, configs/poem-gpu.toml on a GPU)")
    p.add_argument("--minutes", type=float, help="training budget (default: 10 on a CPU, 3 on a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def _run_poem(args: argparse.Namespace) -> None:
    from .poem import make_poem

    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        raise GPTSmallError(f"--minutes must be a positive number, got {args.minutes}")
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
    p.add_argument("--weights", default="float32", help=_WEIGHTS_HELP)
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
    from .device import configure_process
    from .study import EXTRAPOLATION_TOKENS, compare_encodings, format_results, parse_encodings

    encodings = parse_encodings(args.model__pos_encoding)
    args.model__pos_encoding = None  # the study sets it per run
    from . import limits

    limits.positive_int(args.seeds, "--seeds", limits.MAX_NUM_SAMPLES)
    limits.optional_positive_int(args.extrapolation_tokens, "--extrapolation-tokens")
    data = PreparedData(args.data)
    _, model_cfg, train_cfg = _configs_from_args(args, vocab_size=data.tokenizer.vocab_size)
    configure_process(device=train_cfg.device, threads=train_cfg.threads)
    out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    results = compare_encodings(encodings, model_config=model_cfg, train_config=train_cfg, data=data, out_dir=out,
                                seeds=args.seeds, show_progress=not args.no_progress,
                                extrapolation_tokens=EXTRAPOLATION_TOKENS if args.extrapolation_tokens is None
                                else args.extrapolation_tokens)
    print(format_results(results))


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
    p.add_argument("--weights", default="float32", help=_WEIGHTS_HELP)
    p.add_argument("--window-keep", help=_WINDOW_KEEP_HELP)


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
    p.add_argument("--window-keep", help=_WINDOW_KEEP_HELP)


def _run_report(args: argparse.Namespace) -> None:
    from .report import make_report, report_line

    r = make_report(args.checkpoint, samples=args.samples, out=args.out, data=args.data, lines=args.lines,
                    seed=args.seed, temperature=args.temperature, eval_tokens=args.eval_tokens, device=args.device,
                    window_keep=args.window_keep)
    print(report_line(r))
    print(f"wrote {r['out']}/report.json, report.md, report.png")


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("show the model train would build: its configuration, parameters and FLOPs per token", _args_info, _run_info),
    "train": ("train a model on prepared data (resumable, kill-safe checkpoints)", _args_train, _run_train),
    "generate": ("write text with a trained model (KV cache, streaming)", _args_generate, _run_generate),
    "poem": ("the main job: prepare eng-poem, train (the CPU or GPU recipe), print three poems", _args_poem, _run_poem),
    "prepare": ("tokenize a built-in corpus or your text into train/val token files", _args_prepare, _run_prepare),
    "eval": ("loss, perplexity and bits/char of a checkpoint on a text or prepared split", _args_eval, _run_eval),
    "report": ("judge a model's poems against the corpus: copying, form, language, loss", _args_report,
               _run_report),
    "compare": ("train learned, sinusoidal and rope models side by side and compare them", _args_compare,
                _run_compare),
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
