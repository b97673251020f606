"""The README.md model card of an exported folder, written from the run folder's own records.

It states what a reader needs to trust and reuse the model: the architecture and how to load it,
the training data (source, size, split, sha256 from the data folder's meta.json), the tokenizer,
the whole-validation-split loss and bits/char of the exported step (summary.json; evaluated here
when the run did not record that step and its data folder is present), and the command that
trained it: the one recorded in run_config.json, else an equivalent command rebuilt from the
resolved configs there (a preset plus `--set` for every field that differs from it).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..config import PRESETS, GPTConfig, TrainConfig

HF_CLASS = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
            "gpt_small": "GPTSmallForCausalLM, from this folder's modeling_gpt_small.py"}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def run_folder(ckpt: Checkpoint) -> Path | None:
    """runs/X for a checkpoint at runs/X/checkpoints/step-N."""
    return ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else None


def equivalent_command(run_config: dict[str, Any], run_dir: str) -> str:
    """`gpt-small train` with the preset closest to the model and `--set` for every other field."""
    model, train = run_config.get("model", {}), run_config.get("train", {})
    defaults = GPTConfig().to_dict()

    def differing(preset: str) -> dict[str, Any]:
        base = {**defaults, **PRESETS[preset]}
        return {k: v for k, v in model.items() if k != "vocab_size" and base.get(k) != v}

    args = ["gpt-small", "train", "--data", str(run_config.get("data", "DATA")), "--out", run_dir]
    if run_config.get("init_from"):  # the shape is the checkpoint's; only dropout may differ
        args += ["--init-from", str(run_config["init_from"])]
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
                      evaluate: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(whole-split result, where it came from) for the exported step."""
    step = ckpt.meta.get("step")
    if summary:
        for key in ("final_val", "best_checkpoint_val"):
            res = summary.get(key)
            res_step = summary.get("steps") if key == "final_val" else (res or {}).get("step")
            if res and res_step == step:
                return res, "recorded by the training run (summary.json)"
    data_dir = Path(str((ckpt.meta.get("data") or {}).get("directory", "")))
    if evaluate and data_dir.name and (data_dir / "meta.json").is_file():
        from ..data import PreparedData
        from ..evaluate import evaluate_tokens
        from ..tokenizer import same_tokenizer

        data = PreparedData(data_dir)
        if same_tokenizer(data.tokenizer, ckpt.tokenizer):
            res = evaluate_tokens(ckpt.model, data.val, context=ckpt.model.config.block_size, batch_size=8,
                                  chars_per_token=data.chars_per_token("val"))
            return res.to_dict(), f"evaluated at export on {data_dir}/val.bin"
    why = "its data folder is absent" if evaluate else "export ran with --no-eval"
    return None, f"not measured: the run recorded no whole-split figure for this step and {why}"


def model_card(ckpt: Checkpoint, *, architecture: str, reason: str, dtype: str, evaluate: bool = True) -> str:
    cfg = ckpt.model.config
    run_dir = run_folder(ckpt)
    summary = _read_json(run_dir / "summary.json") if run_dir else None
    run_config = _read_json(run_dir / "run_config.json") if run_dir else None
    data_info = ckpt.meta.get("data") or {}
    data_meta = _read_json(Path(str(data_info.get("directory", ""))) / "meta.json") if data_info.get("directory") else None
    trust = ", trust_remote_code=True" if architecture == "gpt_small" else ""
    tok = ckpt.tokenizer
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt-small, poetry]", "---", "",
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
        "print(pipeline(\"text-generation\", model=model, tokenizer=tokenizer)(\"The sea\", max_new_tokens=60)[0][\"generated_text\"])",
        "```", "",
        "## Tokenizer", "",
    ]
    if tok.kind == "char":
        lines.append(f"Characters: {tok.vocab_size} ids, one per character of the training split and one for "
                     "unknown characters (U+FFFD, never generated).")
    elif tok.kind == "gpt2":
        lines.append("OpenAI's GPT-2 byte-level BPE (50,257 tokens); `<|endoftext|>` is an ordinary token here.")
    else:
        lines.append(f"A byte-level BPE of {tok.vocab_size:,} tokens learned on the training split.")
    lines += ["", "## Training data", ""]
    if ckpt.meta.get("imported_from"):
        lines.append(f"Imported from the transformers folder {ckpt.meta['imported_from']} "
                     "(`gpt-small import`); its training data is that model's.")
    elif data_meta:
        lines.append(f"`{data_meta.get('source')}` ({data_meta.get('source_bytes', 0):,} bytes, "
                     f"{data_meta.get('source_lines', 0):,} lines, sha256 {data_meta.get('source_sha256', '?')}), "
                     f"split {data_meta.get('split')}: {data_meta.get('train_tokens', 0):,} training and "
                     f"{data_meta.get('val_tokens', 0):,} validation tokens "
                     f"({data_meta.get('val_chars_per_token', float('nan')):.3f} characters per token).")
    else:
        lines.append(f"Prepared data folder `{data_info.get('directory', 'unknown')}` (its meta.json is not on this "
                     "machine).")
    if ckpt.meta.get("init_from"):
        lines.append(f"Fine-tuned from `{ckpt.meta['init_from']}`.")
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
        command = run_config.get("command") or equivalent_command(run_config, str(run_dir))
        label = "Command" if run_config.get("command") else "An equivalent command (rebuilt from run_config.json)"
        lines += [f"{label}:", "", "```sh", command, "```"]
        if summary:
            lines += ["", f"{summary.get('steps', 0):,} steps, {summary.get('tokens', 0):,} tokens, "
                      f"{summary.get('wall_seconds', 0):.0f} s, stopped by {summary.get('stopped_by')}; "
                      f"device {run_config.get('device', '?')}."]
    else:
        lines.append("No run folder records (run_config.json) beside this checkpoint.")
    return "\n".join(lines) + "\n"
