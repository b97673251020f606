"""`gpt-small generate`: free text, or a poem in a verse form (forms.py), from a checkpoint.

Every flag is checked before the first byte reaches stdout; with a verse-form flag (--rhyme,
--syllables, --stanzas) the poem is written line by line by `forms.compose` and a summary line
per poem goes to stderr. The --weights and --window-keep help texts are shared with the other
verbs that load a checkpoint (cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import limits
from .config import LINE_TOKEN_BUDGET  # --lines N without --max-new-tokens: room for N lines
from .errors import GPTSmallError

# shared by generate, eval, serve and report (cli.py)
WEIGHTS_HELP = ("float32 (default), bfloat16 or int8: the Linear weights' precision for inference, "
                "converted at load (faster CPU decoding; docs/decoding.md)")
WINDOW_KEEP_HELP = ("past the model's context, tokens of the full window kept and re-prefilled: half (default; "
                    "the context eval's default stride scores), slide (the exact per-token slide of older "
                    "versions) or a number (docs/decoding.md)")


def args_generate(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--weights", default="float32", help=WEIGHTS_HELP)
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--window-keep", help=WINDOW_KEEP_HELP)
    verse = p.add_argument_group("verse form (any of these writes a poem line by line: docs/poetry.md)")
    verse.add_argument("--rhyme", help="rhyme scheme: ABAB, AABB, ABBA, 'ABAB CDCD EFEF GG', or sonnet, quatrain, ...")
    verse.add_argument("--syllables", type=int, help="target syllables per line")
    verse.add_argument("--syllable-tolerance", type=int, help="allowed difference (default: 1)")
    verse.add_argument("--stanzas", type=int, help="stanzas, apart by blank lines (default: the scheme's)")
    verse.add_argument("--candidates", type=int, help="lines sampled per round (default: 16)")
    verse.add_argument("--budget", type=int, help="candidate lines per verse line at most (default: 512)")
    verse.add_argument("--form-meta", metavar="FILE", help="write the poem's metadata (JSON) here")


def run_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .corpus import read_text_source
    from .device import pick_device
    from .generate import check_sampling_args, generate_text, window_keep
    from .ops.quantize import check_weights, convert_weights

    # Everything is checked before the first byte reaches stdout: a sample that starts and then
    # fails leaves the user a prompt and a traceback-free error, but a mixed stream.
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
        return _run_form(args, prompt, device)
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


def _run_form(args: argparse.Namespace, prompt: str, device: Any) -> None:
    """`gpt-small generate` with verse-form flags: the poems on stdout, a summary line each on stderr.
    The sampling options, counts, weights and device were checked by the caller (run_generate)."""
    from .checkpoint import load_checkpoint
    from .forms import Form, SearchConfig, compose, summary
    from .generate import window_keep
    from .ops.quantize import convert_weights

    given = {k: v for k, v in (("tolerance", args.syllable_tolerance), ("candidates", args.candidates),
                               ("budget", args.budget)) if v is not None}  # the dataclasses hold the defaults
    form = Form(lines=args.lines, stanzas=args.stanzas, syllables=args.syllables, rhyme=args.rhyme,
                **{k: v for k, v in given.items() if k == "tolerance"})
    form.plan()  # a bad scheme fails before the checkpoint loads
    if args.max_new_tokens is not None and args.max_new_tokens < 2:
        raise GPTSmallError(f"--max-new-tokens with a verse form is the most tokens per line, at least 2, "
                            f"got {args.max_new_tokens}")
    search = SearchConfig(max_line_tokens=args.max_new_tokens, **{k: v for k, v in given.items() if k != "tolerance"})
    if args.repetition_penalty != 1.0 or args.stop:
        raise GPTSmallError("--repetition-penalty and --stop do not apply to verse forms")
    if args.form_meta:  # a folder that is missing fails now, not after the poems are printed
        from .fileio import check_writable

        check_writable(args.form_meta, "--form-meta")
    ckpt = load_checkpoint(args.checkpoint, device=device)
    convert_weights(ckpt.model, args.weights)
    window_keep(ckpt.model.config.block_size, getattr(args, "window_keep", None))  # one line, before output
    metas = []
    for i in range(args.num_samples):
        poem = compose(ckpt.model, ckpt.tokenizer, form, prompt=prompt, search=search, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=None if args.seed is None else args.seed + i,
                       keep=getattr(args, "window_keep", None))
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(poem.text)
        sys.stdout.flush()
        print(summary(poem.meta), file=sys.stderr)
        metas.append(poem.meta)
    if args.form_meta:
        from pathlib import Path

        from .fileio import atomic_write

        atomic_write(Path(args.form_meta), json.dumps(metas[0] if len(metas) == 1 else metas, indent=2) + "\n")
