"""The model calls of a verse form's search (forms.py), batched over rows of one KV cache.

A form's search asks the model three things, each for many rows at once: sample whole lines from
the poem so far (`sample_lines`), give the next token's log-probabilities (`next_token_logprobs`)
and score given continuations teacher-forced (`score_continuations`). The poem so far runs through
the model once and its KV cache is copied to every row (`_prefill_rows`). `ModelCalls` puts the
three behind one object; the server runs the same three methods as rows of its batch
(serve/forms.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .generate import decode_one, prefill, sample
from .kv_cache import rows_of

# Each call runs under torch.inference_mode() as a `with` block rather than a decorator: the
# mutation tool (tools/mutate.py, mutmut) leaves decorated functions unmutated.


def _prefill_rows(model: nn.Module, prefix: Tensor, rows: int, cache_len: int) -> Tensor:
    """Set up a KV cache of `rows` rows holding `prefix` (T,) in each; logits (rows, V) of its last token.

    The prefix runs once, in row 0, and the cache (kv_cache.ModelCache) copies it to the other rows;
    a model without such a cache runs the prefix in every row (same result, more work).
    """
    with torch.inference_mode():
        T = prefix.shape[0]
        model.setup_kv_cache(rows, cache_len)
        pos = torch.arange(T, device=prefix.device)
        cache = getattr(model, "kv_cache", None)
        if rows > 1 and cache is not None:
            with rows_of(model, 0, 1):
                logits = prefill(model, prefix[None], pos)
            cache.broadcast_row(0, T)
            return logits.expand(rows, -1).clone()
        return prefill(model, prefix[None].expand(rows, -1).contiguous(), pos)


def sample_lines(model: nn.Module, prefix: Tensor, rows: int, max_tokens: int, newline: Tensor,
                 generator: torch.Generator | None, sampling: dict, banned: list[int]) -> list[tuple[list[int], float, bool]]:
    """Sample `rows` continuations of prefix (T,) up to and including a token in `newline` (bool (V,)).
    Returns (ids, log-probability under the model at temperature 1, ended with a newline) per row."""
    with torch.inference_mode():
        T = prefix.shape[0]
        logits = _prefill_rows(model, prefix, rows, T + max_tokens)
        out = prefix.new_zeros(rows, max_tokens)  # (new_*: the prefix's device, and dtype unless given)
        logp = prefix.new_zeros(rows, dtype=torch.float64)
        done = prefix.new_zeros(rows, dtype=torch.bool)
        length = prefix.new_full((rows,), max_tokens)
        positions = torch.arange(T + max_tokens, device=prefix.device)
        for t in range(max_tokens):
            lp = F.log_softmax(logits.float(), dim=-1)
            if banned:
                logits[:, banned] = float("-inf")
            cur = sample(logits, generator=generator, **sampling)  # (rows,)
            out[:, t] = cur
            logp += torch.where(done, 0.0, lp.gather(1, cur[:, None]).squeeze(1))  # summed in float64
            ended = ~done & newline[cur]
            length[ended] = t + 1
            done |= ended
            if bool(done.all()) or t + 1 == max_tokens:
                break
            logits = decode_one(model, cur, positions[T + t:T + t + 1])
        return [(out[i, :length[i]].tolist(), float(logp[i]), bool(done[i])) for i in range(rows)]


def next_token_logprobs(model: nn.Module, prefix: Tensor) -> Tensor:
    """log p(next token | prefix (T,)) -> (V,)."""
    with torch.inference_mode():
        model.setup_kv_cache(1, prefix.shape[0])
        pos = torch.arange(prefix.shape[0], device=prefix.device)
        return F.log_softmax(prefill(model, prefix[None], pos).float(), dim=-1)[0]


def score_continuations(model: nn.Module, prefix: Tensor, conts: list[list[int]], batch_rows: int) -> list[float]:
    """log p(cont | prefix) for each token list in conts, teacher-forced from prefix's shared cache."""
    with torch.inference_mode():
        T = prefix.shape[0]
        scores: list[float] = []
        for i in range(0, len(conts), batch_rows):
            group = conts[i:i + batch_rows]
            B, L = len(group), max(map(len, group))
            first = F.log_softmax(_prefill_rows(model, prefix, B, T + L).float(), dim=-1)  # (B, V)
            ids = prefix.new_zeros(B, L)
            for r, c in enumerate(group):
                ids[r, :len(c)] = prefix.new_tensor(c)
            lp = [first.gather(1, ids[:, :1])]  # (B, 1)
            if L > 1:
                logits = model(ids[:, :-1], input_pos=torch.arange(T, T + L - 1, device=prefix.device))  # (B, L-1, V)
                lp.append(F.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2))
            lp = torch.cat(lp, dim=1).double()  # (B, L)
            lengths = prefix.new_tensor([len(c) for c in group])
            mask = torch.arange(L, device=prefix.device)[None, :] < lengths[:, None]
            scores.extend((lp * mask).sum(dim=1).tolist())
        return scores


class ModelCalls:
    """The three model calls of a form's search. `compose` runs them on the model directly; the
    server runs them as rows of its batch (serve/forms.py) behind the same three methods."""

    def __init__(self, model: nn.Module, newline: Tensor, generator: torch.Generator | None, sampling: dict,
                 banned: list[int], batch_rows: int):
        self.model, self.newline, self.generator = model, newline, generator
        self.sampling, self.banned, self.batch_rows = sampling, banned, batch_rows

    def sample_lines(self, prefix: Tensor, rows: int, max_tokens: int) -> list[tuple[list[int], float, bool]]:
        return sample_lines(self.model, prefix, rows, max_tokens, self.newline, self.generator, self.sampling,
                            self.banned)

    def next_token_logprobs(self, prefix: Tensor) -> Tensor:
        return next_token_logprobs(self.model, prefix)

    def score_continuations(self, prefix: Tensor, conts: list[list[int]]) -> list[float]:
        return score_continuations(self.model, prefix, conts, self.batch_rows)
