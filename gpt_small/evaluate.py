"""Exact loss over a whole token sequence, and the units we report it in.

Every token after the first is predicted exactly once. With `stride == context` the windows do
not overlap (each token sees the context since its window began); with a smaller stride each
window scores only its last `stride` targets, so every prediction gets at least
`context - stride` tokens of left context (the "sliding window" perplexity of Hugging Face's
docs). Each target's loss is taken from the model's logits (float32, or float64 for a float64
model) and summed in float64, so the result is the same on every run.

Units: nats per token (the cross-entropy), perplexity = e^loss, and bits per character =
loss / ln 2 / characters-per-token, which compares runs with different tokenizers.

`evaluate_checkpoint` is what `gpt-small eval` calls: a checkpoint on a text file, a built-in
corpus or a prepared split. Its default stride is context // 2: every scored token then has at
least half a context of left context, at twice the cost of non-overlapping windows (the
training's final evaluation uses stride = context, so the two numbers differ slightly).
A context past `block_size` is the length-extrapolation measurement: sinusoidal and RoPE models
extend their tables; a learned table cannot, and asking for it is an error.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, load_checkpoint
from .errors import GPTSmallError
from .tokenizer import same_tokenizer


@dataclass
class EvalResult:
    loss: float  # nats per token
    tokens: int  # targets scored
    chars_per_token: float
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(self.loss, self.chars_per_token)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_char": self.bits_per_char,
                "tokens": self.tokens, "chars_per_token": self.chars_per_token,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second}


def bits_per_char(loss_nats_per_token: float, chars_per_token: float) -> float:
    return loss_nats_per_token / math.log(2) / chars_per_token


def check_stride(context: int, stride: int) -> None:
    """The one rule for a stride: new tokens per window, 1 to the whole context."""
    if not 1 <= stride <= context:
        raise GPTSmallError(f"stride must be between 1 and the context ({context}), got {stride}")


EVAL_DTYPES = ("float32", "bfloat16", "float16")  # autocast for evaluation; float32 = none, the exact figure


def strided_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: inputs tokens[start:end], targets tokens[start+1:end+1],
    of which targets at positions >= first_scored count. Every target 1..n-1 is scored once."""
    if n_tokens < 2:
        raise GPTSmallError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    check_stride(context, stride)
    windows, scored_to = [], 0  # targets at positions <= scored_to are done (position 0 is never a target)
    last = n_tokens - 1
    end = min(context, last)
    while True:
        start = max(0, end - context)
        windows.append((start, end, scored_to + 1))
        scored_to = end
        if end == last:
            return windows
        end = min(end + stride, last)


@torch.inference_mode()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, *, context: int, stride: int | None = None,
                    batch_size: int = 16, chars_per_token: float = 1.0,
                    device: torch.device | str = "cpu", autocast_dtype: torch.dtype = torch.float32) -> EvalResult:
    """Mean cross-entropy over every target of `tokens` (a 1-D array of ids)."""
    from .device import autocast

    device = torch.device(device)
    stride = stride or context
    windows = strided_windows(len(tokens), context, stride)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        lengths = {e - s for s, e, _ in group}
        for length in sorted(lengths):  # only the first window of a short text differs in length
            rows = [w for w in group if w[1] - w[0] == length]
            x = torch.from_numpy(np.stack([np.asarray(tokens[s:e], dtype=np.int64) for s, e, _ in rows]))
            y = torch.from_numpy(np.stack([np.asarray(tokens[s + 1:e + 1], dtype=np.int64) for s, e, _ in rows]))
            # targets before first_scored were scored by an earlier window: mask them out with -1
            pos = torch.arange(length)[None, :] + torch.tensor([s for s, _, _ in rows])[:, None] + 1
            first = torch.tensor([f for _, _, f in rows])[:, None]
            y = torch.where(pos >= first, y, torch.full_like(y, -1))
            x, y = x.to(device), y.to(device)
            with autocast(device, autocast_dtype):
                logits = model(x)
            # float32 per target (float64 if the model is), summed in float64: a float32 sum over a
            # long text would drift, and its order would depend on the batch layout
            logits = logits if logits.dtype == torch.float64 else logits.float()
            nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="none")
            total += nll.double().sum().item()
            count += int((y >= 0).sum())
    model.train(was_training)
    return EvalResult(loss=total / count, tokens=count, chars_per_token=chars_per_token,
                      seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- a checkpoint on a text

def default_stride(context: int) -> int:
    return max(1, context // 2)


def check_context(block_size: int, pos_encoding: str, context: int) -> None:
    """A context the model can run: positive, and within the table of learned positions."""
    if context < 1:
        raise GPTSmallError(f"context must be a positive number of tokens, got {context}")
    if pos_encoding == "learned" and context > block_size:
        raise GPTSmallError(f"context {context} is longer than the learned position table ({block_size}); "
                            "only sinusoidal and rope models evaluate past block_size")


def unknown_note(unknown: collections.Counter[str] | dict[str, int], top: int = 10) -> str:
    """'12 characters outside the vocabulary (mapped to <unk>): '§' x7, ...' ('' when none)."""
    n = sum(unknown.values())
    if not n:
        return ""
    common = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{c!r} x{k}" for c, k in common[:top])
    more = f", and {len(common) - top} other kinds" if len(common) > top else ""
    return f"{n} character{'s' if n != 1 else ''} outside the vocabulary (mapped to <unk>): {shown}{more}"


def _tokens_of(ckpt: Checkpoint, *, text: str | Path | None, corpus: str | None, data: str | Path | None,
               split: str) -> tuple[np.ndarray, float, str, collections.Counter[str] | dict[str, int]]:
    """(token ids, characters per token, a description of the source, unknown characters)."""
    if sum(x is not None for x in (text, corpus, data)) != 1:
        raise GPTSmallError("give exactly one thing to evaluate: --text FILE, --corpus NAME or --data DIR")
    if data is not None:
        from .data import PreparedData

        prepared = PreparedData(data)
        if not same_tokenizer(ckpt.tokenizer, prepared.tokenizer):
            raise GPTSmallError(f"{prepared.directory} was prepared with another tokenizer ({prepared.meta['tokenizer']}, "
                                f"vocab {prepared.vocab_size}) than the checkpoint's ({ckpt.tokenizer.kind}, "
                                f"vocab {ckpt.tokenizer.vocab_size}); prepare the text with the checkpoint's "
                                "tokenizer or use --text")
        tokens = prepared.val if split == "val" else prepared.train
        # prepare builds the vocabulary from the training lines, so only validation can hold unknowns
        unknown = prepared.meta.get("val_unknown_top", {}) if split == "val" else {}
        if split == "val" and prepared.meta.get("val_unknown_chars", 0) > sum(unknown.values()):
            unknown = {**unknown, "(others)": prepared.meta["val_unknown_chars"] - sum(unknown.values())}
        return tokens, prepared.chars_per_token(split), f"{split} split of {prepared.directory}", unknown
    from .corpus import corpus_path, read_text_source

    path = corpus_path(corpus) if corpus is not None else Path(text)
    content = read_text_source(path)
    tokens = ckpt.tokenizer.encode_to_array(content, unknown="unk")
    if len(tokens) == 0:
        raise GPTSmallError(f"{path} encodes to no tokens")
    source = f"corpus {corpus}" if corpus is not None else str(path)
    return tokens, len(content) / len(tokens), source, ckpt.tokenizer.count_unknown(content)


def evaluate_checkpoint(checkpoint: str | Path | Checkpoint, *, text: str | Path | None = None,
                        corpus: str | None = None, data: str | Path | None = None,
                        split: Literal["val", "train"] = "val", context: int | None = None,
                        stride: int | None = None, batch_size: int = 8, device: str = "auto",
                        dtype: str = "float32", weights: str = "float32") -> dict[str, Any]:
    """Loss, perplexity and bits per character of a checkpoint (path or loaded) on one text source.

    context defaults to the model's block_size, stride to context // 2. dtype float32 by default:
    the exact number, not the fastest one (bfloat16 on a GPU is the faster choice). weights:
    the Linear weights converted to bfloat16 or int8 first (ops/quantize.py; a loaded checkpoint
    is converted in place), to measure what decoding with them costs in loss.
    """
    from .device import pick_device, pick_dtype
    from .ops.quantize import check_weights, convert_weights

    if dtype not in EVAL_DTYPES:
        raise GPTSmallError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
    if split not in ("val", "train"):
        raise GPTSmallError(f"split must be val or train, got {split!r}")
    from . import limits

    limits.positive_int(batch_size, "batch_size", limits.MAX_BATCH_SIZE)
    if context is not None:
        limits.positive_int(context, "context", limits.MAX_BLOCK_SIZE)
    check_weights(weights)
    dev = pick_device(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=dev)
    ckpt.model.to(dev)
    convert_weights(ckpt.model, weights)
    cfg = ckpt.model_config
    context = cfg.block_size if context is None else context
    check_context(cfg.block_size, cfg.pos_encoding, context)
    stride = default_stride(context) if stride is None else stride
    check_stride(context, stride)  # before the text is read and encoded
    tokens, cpt, source, unknown = _tokens_of(ckpt, text=text, corpus=corpus, data=data, split=split)
    res = evaluate_tokens(ckpt.model, tokens, context=context, stride=stride, batch_size=batch_size,
                          chars_per_token=cpt, device=dev, autocast_dtype=pick_dtype(dtype, dev))
    return {
        "checkpoint": str(ckpt.path), "step": ckpt.meta.get("step"), "source": source,
        "pos_encoding": cfg.pos_encoding, "block_size": cfg.block_size,
        "context": context, "stride": stride, "context_over_block_size": context / cfg.block_size,
        **res.to_dict(),
        "unknown_chars": int(sum(unknown.values())), "unknown_top": dict(unknown),
        "unknown_note": unknown_note(unknown), "device": str(dev), "dtype": dtype, "weights": weights,
    }


def format_eval(r: dict[str, Any]) -> str:
    """The lines `gpt-small eval` prints."""
    lines = [f"{r['checkpoint']} (step {r['step']}, {r['pos_encoding']}, block_size {r['block_size']}) "
             f"on {r['source']}",
             f"  {r['tokens']:,} tokens scored, context {r['context']}, stride {r['stride']}"
             + (f" ({r['context_over_block_size']:g}x the training context)" if r["context"] != r["block_size"] else ""),
             f"  loss {r['loss']:.4f} nats/token   perplexity {r['perplexity']:.3f}   "
             f"{r['bits_per_char']:.4f} bits/char ({r['chars_per_token']:.3f} chars/token)",
             f"  {r['tokens_per_second']:,.0f} tokens/s, {r['seconds']:.1f} s on {r['device']}"
             + (f", {r['weights']} weights" if r.get("weights", "float32") != "float32" else "")]
    if r["unknown_note"]:
        lines.append(f"  note: {r['unknown_note']}")
    return "\n".join(lines)
