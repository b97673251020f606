"""Exact loss over a whole token sequence, and the units we report it in.

Every token after the first is predicted exactly once. With `stride == context` the windows do
not overlap (each token sees the context since its window began); with a smaller stride each
window scores only its last `stride` targets, so every prediction gets at least
`context - stride` tokens of left context (the "sliding window" perplexity of Hugging Face's
docs). The sum is accumulated in float64, so the result is the same on every run.

Units: nats per token (the cross-entropy), perplexity = e^loss, and bits per character =
loss / ln 2 / characters-per-token, which compares runs with different tokenizers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import GPTSmallError


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


def strided_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: inputs tokens[start:end], targets tokens[start+1:end+1],
    of which targets at positions >= first_scored count. Every target 1..n-1 is scored once."""
    if n_tokens < 2:
        raise GPTSmallError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    if not 1 <= stride <= context:
        raise GPTSmallError(f"stride must be in [1, context={context}], got {stride}")
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
            nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                  ignore_index=-1, reduction="sum")
            total += nll.double().item()
            count += int((y >= 0).sum())
    model.train(was_training)
    return EvalResult(loss=total / count, tokens=count, chars_per_token=chars_per_token,
                      seconds=time.perf_counter() - t0)
