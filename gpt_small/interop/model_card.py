"""The README.md model card of an exported folder, written from the run folder's own records.

It states what a reader needs to trust and reuse the model: the architecture and how to load it,
the training data (source, size, split, sha256 from the data folder's meta.json), the tokenizer,
the whole-validation-split loss and bits/char of the exported step (summary.json; evaluated here
when the run did not record that step and its data folder is present), and the command that
trained it: the one recorded in run_config.json, else an equivalent command rebuilt from the
resolved configs there (a preset plus `--set` for every field that differs from it); then what it
cannot do (context limit, end-of-text, sampling defaults, runtimes) and a licence section.

The card is meant to be shared, so it names no absolute local path: a folder outside the current
one is written by its name, under `data/` or `runs/` as gpt-small's own commands lay them out.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..config import PRESETS, GPTConfig, TrainConfig
from ..errors import GPTSmallError
from ..run_folder import read_run_config
from ..schemas import read_json
from .hf_tokenizer import eos_token

SNIPPET_PROMPT = "The sea"
SNIPPET_NEW_TOKENS = 60  # asked for where the export can go past the context (the remote code slides)
POETRY_CORPORA = ("eng-poem", "gutenberg-poetry")  # the built-in corpora: Gutenberg Poetry verse
PATH_FLAGS = {"--data": "data", "--out": "runs", "--init-from": "runs", "--checkpoint": "runs", "--text": ""}

HF_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
            "gpt_small": "GPTSmallForCausalLM, from this folder's modeling_gpt_small.py"}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A record the card can go without: None where it is missing or damaged."""
    try:
        d = read_json(path)
    except GPTSmallError:
        return None
    return d if isinstance(d, dict) else None


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_run_config(run_dir)
    except GPTSmallError:  # damaged: the card says the run is not recorded
        return None


def run_folder(ckpt: Checkpoint) -> Path | None:
    """runs/X for a checkpoint at runs/X/checkpoints/step-N."""
    return ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else None


def data_folder(ckpt: Checkpoint) -> Path | None:
    """The prepared-data folder the checkpoint names, if present: as recorded, or (a relative path,
    exported from another folder) relative to the folder that holds the run's `runs/`."""
    recorded = (ckpt.meta.get("data") or {}).get("directory")
    if not recorded:
        return None
    candidates = [Path(str(recorded))]
    run_dir = run_folder(ckpt)
    if run_dir and not candidates[0].is_absolute():
        candidates.append(run_dir.parent.parent / candidates[0])
    return next((c for c in candidates if (c / "meta.json").is_file()), None)


def portable(path: str | Path, folder: str = "") -> str:
    """`path` as a card may print it: relative paths as they are, an absolute one as `folder/NAME`."""
    text = str(path)
    if not (text.startswith("/") or text.startswith("~")):
        return text
    path = Path(text).expanduser()
    name = path.name or text
    if path.parent.name == "checkpoints":  # runs/X/checkpoints/step-N: keep the run's name
        name = f"{path.parent.parent.name}/checkpoints/{name}"
    return f"{folder}/{name}" if folder else name


def portable_command(command: str) -> str:
    """A recorded command with every absolute path made portable (PATH_FLAGS, else the basename)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return command
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag in PATH_FLAGS:
            out.append(f"{flag}={portable(value, PATH_FLAGS[flag])}")
        else:
            out.append(portable(arg, PATH_FLAGS.get(argv[i - 1], "") if i else ""))
    return shlex.join(out)


def snippet_length(ckpt: Checkpoint, architecture: str) -> tuple[str, int]:
    """(prompt, max_new_tokens) for the card's snippet: within the context, unless the code slides."""
    block = ckpt.model.config.block_size
    if architecture == "gpt_small":
        return SNIPPET_PROMPT, SNIPPET_NEW_TOKENS
    prompt = SNIPPET_PROMPT
    while len(prompt) > 1 and len(ckpt.tokenizer.encode(prompt)) >= block:
        prompt = prompt[:-1]
    return prompt, max(1, min(SNIPPET_NEW_TOKENS, block - len(ckpt.tokenizer.encode(prompt))))


def equivalent_command(run_config: dict[str, Any], run_dir: str) -> str:
    """`gpt-small train` with the preset closest to the model and `--set` for every other field."""
    model, train = run_config.get("model", {}), run_config.get("train", {})
    defaults = GPTConfig().to_dict()

    def differing(preset: str) -> dict[str, Any]:
        base = {**defaults, **PRESETS[preset]}
        return {k: v for k, v in model.items() if k != "vocab_size" and base.get(k) != v}

    args = ["gpt-small", "train", "--data", portable(run_config.get("data", "DATA"), "data"),
            "--out", portable(run_dir, "runs")]
    if run_config.get("init_from"):  # the shape is the checkpoint's; only dropout may differ
        args += ["--init-from", portable(run_config["init_from"], "runs")]
        model_sets = {"dropout": model["dropout"]} if "dropout" in model else {}
    else:
        preset = min(PRESETS, key=lambda p: len(differing(p)))
        args += ["--preset", preset]
        model_sets = differing(preset)
    train_defaults = TrainConfig().to_dict()
    for section, items in (("model", model_sets),
                           ("train", {k: v for k, v in train.items() if train_defaults.get(k) != v})):
        for k, v in items.items():
            value = str(v).lower() if isinstance(v, bool) else str(v)
            args += ["--set", f"{section}.{k}={value}"]
    return shlex.join(args)


def validation_figure(ckpt: Checkpoint, summary: dict[str, Any] | None,
                      evaluate: bool) -> tuple[dict[str, Any] | None, str]:
    """(whole-split result, where it came from) for the exported step."""
    step = ckpt.meta.get("step")
    if summary:
        for key in ("final_val", "best_checkpoint_val"):
            res = summary.get(key)
            res_step = summary.get("steps") if key == "final_val" else (res or {}).get("step")
            if res and res_step == step:
                return res, "recorded by the training run (summary.json)"
    data_dir = data_folder(ckpt)
    if not evaluate:
        why = "export ran with --no-eval"
    elif data_dir is None:
        why = "its data folder is absent"
    else:
        from ..data import PreparedData
        from ..evaluate import evaluate_tokens
        from ..tokenizer import same_tokenizer

        data = PreparedData(data_dir)
        if same_tokenizer(data.tokenizer, ckpt.tokenizer):
            res = evaluate_tokens(ckpt.model, data.val, context=ckpt.model.config.block_size, batch_size=8,
                                  chars_per_token=data.chars_per_token("val"))
            return res.to_dict(), f"evaluated at export on {portable(data_dir, 'data')}/val.bin"
        why = f"its data folder ({portable(data_dir, 'data')}) now holds another tokenizer's tokens"
    return None, f"not measured: the run recorded no whole-split figure for this step and {why}"


def tags(data_meta: dict[str, Any] | None, tok_kind: str) -> list[str]:
    """Hub tags from what the model was trained on (not always poetry)."""
    out = ["gpt-small", "text-generation", f"{tok_kind}-tokenizer"]
    if data_meta and data_meta.get("source_kind") == "corpus" and data_meta.get("source") in POETRY_CORPORA:
        out += ["poetry", "english"]
    return out


def data_lines(ckpt: Checkpoint, data_meta: dict[str, Any] | None) -> list[str]:
    data_info = ckpt.meta.get("data") or {}
    lines = []
    if ckpt.meta.get("imported_from"):
        lines.append(f"Imported from the transformers folder `{portable(ckpt.meta['imported_from'])}` "
                     "(`gpt-small import`); its training data is that model's.")
    elif data_meta:
        source = portable(data_meta.get("source") or "?")  # a corpus's name is not a path: left as it is
        frac = data_meta.get("val_fraction")
        share = f"the last {frac:.0%} of the lines (val_fraction {frac})" if isinstance(frac, float) else "by lines"
        lines.append(f"`{source}` ({data_meta.get('source_bytes', 0):,} bytes, "
                     f"{data_meta.get('source_lines', 0):,} lines, sha256 {data_meta.get('source_sha256', '?')}), "
                     f"split by lines, validation {share}: {data_meta.get('train_tokens', 0):,} training and "
                     f"{data_meta.get('val_tokens', 0):,} validation tokens "
                     f"({data_meta.get('val_chars_per_token', float('nan')):.3f} characters per token).")
    else:
        lines.append(f"Prepared data folder `{portable(data_info.get('directory', 'unknown'), 'data')}` "
                     "(its meta.json is not on this machine).")
    if ckpt.meta.get("init_from"):
        lines.append(f"Fine-tuned from `{portable(ckpt.meta['init_from'], 'runs')}`.")
    return lines


def limitations(ckpt: Checkpoint, architecture: str) -> list[str]:
    from .hf_export import DEFAULT_TEMPERATURE

    cfg, eos = ckpt.model.config, eos_token(ckpt.tokenizer)
    block = cfg.block_size
    if architecture == "gpt2":
        context = (f"- **Context: {block} tokens, prompt included.** GPT-2's position table ends there: "
                   f"transformers raises `IndexError` when it must read more than {block} tokens, i.e. when "
                   f"prompt + `max_new_tokens` exceeds {block + 1} (the last token is generated, never read); "
                   "`gpt-small generate` slides its window instead. Without `max_new_tokens`, "
                   f"generation_config.json stops at {block} tokens (`max_length`). For a longer prompt, pass "
                   "`handle_long_generation=\"hole\"` to the pipeline: it keeps the prompt's last "
                   f"{block} - `max_new_tokens` tokens.")
    elif architecture == "gpt_neox":
        context = (f"- **Context: {block} tokens, prompt included.** Past it GPT-NeoX keeps rotating into "
                   "positions the model never trained on (`gpt-small generate` slides its window instead); "
                   f"keep prompt + `max_new_tokens` within {block}. Without `max_new_tokens`, "
                   f"generation_config.json stops at {block} tokens (`max_length`).")
    else:
        context = (f"- **Context: {block} tokens.** Past it this folder's code slides its window one token at a "
                   f"time (each new token sees the last {block}), as `gpt-small generate --window-keep slide` "
                   "does; it has no KV cache and no padding.")
    stop = (f"- Generation stops at `{eos[0]}` (id {eos[1]}, the EOS in config.json, generation_config.json and "
            "the tokenizer files; `gpt-small generate` does not stop there)." if eos else
            "- No end-of-text token (the tokenizer has none): generation runs to `max_new_tokens`.")
    return [
        context, stop,
        f"- Sampling by default at temperature {DEFAULT_TEMPERATURE}, no top-k or top-p "
        "(generation_config.json); pass `do_sample=False` for greedy text.",
        f"- A small model ({ckpt.model.num_params():,} parameters) trained on one text: it continues text "
        "in that text's manner, knows nothing reliable and follows no instructions. Not evaluated for "
        "bias or safety.",
        "- Other runtimes: see gpt-small's docs/interop.md; `gpt-small export --target vllm|llama.cpp` "
        "refuses a model that runtime would compute differently.",
    ]


def model_card(ckpt: Checkpoint, *, architecture: str, reason: str, dtype: str, evaluate: bool) -> str:
    cfg = ckpt.model.config
    run_dir = run_folder(ckpt)
    summary = _read_json(run_dir / "summary.json") if run_dir else None
    run_config = _run_config(run_dir) if run_dir else None
    data_dir = data_folder(ckpt)
    data_meta = _read_json(data_dir / "meta.json") if data_dir else None
    trust = ", trust_remote_code=True" if architecture == "gpt_small" else ""
    tok = ckpt.tokenizer
    prompt, new_tokens = snippet_length(ckpt, architecture)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "license: other",
        f"tags: [{', '.join(tags(data_meta, tok.kind))}]", "---", "",
        f"# {run_dir.name if run_dir else ckpt.path.name} (gpt-small)", "",
        f"A {cfg.n_layer}-layer, {cfg.n_head}-head, {cfg.n_embd}-wide decoder-only transformer "
        f"({ckpt.model.num_params():,} parameters, {cfg.block_size}-token context), trained with "
        f"gpt-small and exported with `gpt-small export` at step "
        f"{ckpt.meta.get('step')}; weights in {dtype}.", "",
        "## Architecture", "",
        f"- transformers class: {HF_CLASS[architecture]} ({reason})",
        f"- positions {cfg.pos_encoding}, activation {cfg.activation}, biases {cfg.bias}, "
        f"tied head {cfg.tie_embeddings}, QK-norm {cfg.qk_norm}, n-gram tables {cfg.ngram if cfg.ngram > 1 else 'none'}",
        "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        f"model = AutoModelForCausalLM.from_pretrained(\"DIR\"{trust})",
        f"tokenizer = AutoTokenizer.from_pretrained(\"DIR\"{trust})",
        f"print(pipeline(\"text-generation\", model=model, tokenizer=tokenizer)({prompt!r}, "
        f"max_new_tokens={new_tokens})[0][\"generated_text\"])",
        "```", "",
        "## Tokenizer", "",
    ]
    if tok.kind == "char":
        lines.append(f"Characters: {tok.vocab_size} ids, one per character of the training split and one for "
                     "unknown characters (U+FFFD, never generated).")
    elif tok.kind == "gpt2":
        lines.append("OpenAI's GPT-2 byte-level BPE (50,257 tokens); `<|endoftext|>` is the EOS token, while "
                     "the same text inside a prompt is encoded as ordinary characters, as gpt-small does.")
    else:
        lines.append(f"A byte-level BPE of {tok.vocab_size:,} tokens learned on the training split.")
    lines += ["", "## Training data", "", *data_lines(ckpt, data_meta)]
    lines += ["", "## Validation", ""]
    res, source = validation_figure(ckpt, summary, evaluate)
    if res:
        lines.append(f"Whole validation split, every token predicted once: {res['loss']:.4f} nats/token, "
                     f"perplexity {math.exp(res['loss']):.2f}, **{res['bits_per_char']:.4f} bits/char** over "
                     f"{res['tokens']:,} tokens ({source}).")
    else:
        lines.append(f"Whole validation split: {source}.")
    lines += ["", "## How it was trained", ""]
    if run_config:
        recorded = run_config.get("command")
        command = portable_command(recorded) if recorded else equivalent_command(run_config, str(run_dir))
        label = "Command" if recorded else "An equivalent command (rebuilt from run_config.json)"
        lines += [f"{label}:", "", "```sh", command, "```"]
        if summary:
            lines += ["", f"{summary.get('steps', 0):,} steps, {summary.get('tokens', 0):,} tokens, "
                      f"{summary.get('wall_seconds', 0):.0f} s, stopped by {summary.get('stopped_by')}; "
                      f"device {run_config.get('device', '?')}."]
    else:
        lines.append("No run folder records (run_config.json) beside this checkpoint.")
    lines += ["", "## Limitations", "", *limitations(ckpt, architecture)]
    lines += ["", "## Licence", "",
              "gpt-small, the code that trained and exported this model, is MIT-licensed. The weights carry no "
              "licence chosen by gpt-small (`license: other` above): whoever trained them sets one before "
              "sharing, within the terms of the training text."]
    return "\n".join(lines) + "\n"
