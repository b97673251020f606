"""Sampling from a GPT: small pure steps over token ids, with text only at the edge.

The steps (gpt-fast, litgpt):
  apply_repetition_penalty  CTRL's penalty on the tokens already in each row
  top_p_mask, sample        temperature, top-k, nucleus; greedy at temperature 0
  prefill                   a chunk of tokens through the KV cache -> logits of its last position
                            (row-invariant: the same bits alone or in the server's batched prefills)
  decode_one                one token per row at one position -> logits
  Window                    the window rule below: where the cache starts, the next logits
  generate_tokens           the loop: yields one new token per row per step; knows nothing of text
  forced_log_prob           a given text teacher-forced through the same rule (its loss)
  generate_text             the edge: a str prompt in, str samples out, `lines` / `stop`, streaming

The window rule (every decoder: generate, the serve engine, verse forms, report). The KV cache
holds at most block_size tokens, at positions 0..block_size-1. While the sequence fits, there is one
prefill and then one cached decode per token. When the cache is full, the last `keep` tokens of
the window (plus the token just sampled) are re-prefilled in one forward pass at positions 0..keep,
and decoding continues with the cache. `keep` defaults to half the window (`WINDOW_KEEP`); each
token is then predicted from between block_size - stride + 1 and block_size tokens, stride =
block_size - keep, which is exactly what `eval --stride block_size // 2` scores: eval's default
figure is the quality of long samples (tests/test_generate.py checks it to 1e-4 with
`forced_log_prob`). Past the window this costs one prefill of keep + 1 tokens per
block_size - keep new tokens, instead of one prefill of block_size tokens per token.
`keep = "slide"` (block_size - 1) re-prefills the whole window at every step: the exact per-token
slide of nanoGPT's uncached `generate`, kept for reproducing older samples.
The same rule holds for learned, sinusoidal and RoPE positions: a re-prefill starts at position 0,
so no model ever sees a position or a distance it did not see in training. The same seed gives the
same tokens.

Rows of a batch are independent samples; `stop` ends the loop once every row has stopped (rows
that stopped early keep being computed, as the batch has one shape, and their tokens are ignored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from . import limits, ops
from .errors import GPTSmallError

WINDOW_KEEP = "half"  # the one default of every decoder's window rule (module docstring)
EMPTY_PROMPT = "\n"  # an empty prompt starts a new line: the corpus has one verse line per row
_REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 character


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, *, unknown: str = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float = 1.0) -> None:
    """Raise GPTSmallError naming the first impossible sampling setting (limits.check_sampling)."""
    limits.check_sampling(temperature, top_k, top_p, repetition_penalty)


_COUNT_MAX = {"max_new_tokens": limits.MAX_NEW_TOKENS, "num_samples": limits.MAX_NUM_SAMPLES,
              "lines": limits.MAX_LINES}


def _check_count(name: str, value: int | None) -> None:
    limits.optional_positive_int(value, name, _COUNT_MAX[name])


def window_keep(block_size: int, keep: int | str | None = None) -> int:
    """Tokens of a full window kept when it moves on: "half" (the default: block_size minus eval's
    default stride, block_size // 2), "slide" (block_size - 1: the exact per-token slide) or a
    number 0..block_size - 1."""
    keep = WINDOW_KEEP if keep is None else keep
    if keep == "half":
        return block_size - max(1, block_size // 2)
    if keep == "slide":
        return block_size - 1
    if isinstance(keep, str):
        try:
            keep = int(keep)
        except ValueError:
            raise GPTSmallError(f"window keep must be half, slide or a number of tokens, got {keep!r}") from None
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < block_size:
        raise GPTSmallError(f"window keep must be half, slide or a number of tokens from 0 to "
                            f"{block_size - 1} (the window is {block_size}), got {keep!r}")
    return keep


def prompt_text(prompt: str) -> str:
    """The text a model starts from: the prompt, or a newline for an empty one."""
    return prompt or EMPTY_PROMPT


# --- pure steps ---


def apply_repetition_penalty(logits: Tensor, prev_ids: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): for tokens already in a row, divide positive logits by `penalty`
    and multiply negative ones by it. logits (B, V), prev_ids (B, L) -> new logits (B, V)."""
    if penalty == 1.0 or prev_ids.shape[1] == 0:
        return logits
    score = logits.gather(1, prev_ids)  # (B, L); a repeated id gathers and scatters the same value
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, prev_ids, score)


def top_p_mask(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus (Holtzman et al. 2020): True for the smallest set of most likely tokens whose
    probability reaches `top_p`; always at least the most likely one. probs (B, V) -> bool (B, V)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Mass ranked strictly above each token: an exclusive cumsum by shifting, not `cumsum - p`,
    # whose rounding can move a token across the threshold (0.95 - 0.15 != 0.8 in float32).
    above = torch.cat((torch.zeros_like(sorted_probs[:, :1]), sorted_probs.cumsum(dim=-1)[:, :-1]), dim=-1)
    keep_sorted = above < top_p  # the first token has 0 above it, so it is always kept
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from logits (B, V) -> ids (B,). A temperature below
    limits.TEMPERATURE_FLOOR (0 included) or top_k 1 is argmax. NaN logits (NaN weights, an
    overflow) are a one-line GPTSmallError, never a sample from garbage."""
    if torch.isnan(logits).any():
        raise GPTSmallError("the model produced NaN scores (its weights hold NaN or overflow); "
                            "this checkpoint cannot be sampled")
    if temperature < limits.TEMPERATURE_FLOOR or top_k == 1:
        return logits.argmax(dim=-1)
    # Shift each row's maximum to 0 before dividing: every logit is then <= 0 with one at 0, so
    # softmax cannot see inf - inf whatever the temperature (dividing first overflows at 1e-300).
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits.float(), posinf=big, neginf=-big)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:  # at exactly 1 a rounded cumsum could drop the tail
        probs = probs * top_p_mask(probs, top_p)  # multinomial needs no renormalising
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def prefill(model: nn.Module, idx: Tensor, input_pos: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Run idx (B, T) at positions input_pos (T,) through the KV cache -> logits (B, V) of the last
    token; or each row at its own positions input_pos (B, T), padded, with lengths (B,) its real
    tokens -> the logits of each row's last real one.

    Up to ops.row_invariant_max_t tokens (idx's T, the longest row) it runs in the ops layer's
    row-invariant mode (ops/mode.py): a row's logits and cache are the same bits alone or beside any
    other rows, so the serve engine's batched prefills give generate's tokens. A longer sequence
    runs outside it (the library's faster GEMM): prefilled alone, it is the same call here and in
    the engine, but padded beside others its rows would round by the batch."""
    padded = {} if lengths is None else {"lengths": lengths}  # a model without padding support still prefills
    limit = ops.row_invariant_max_t(idx.device)
    with ops.row_invariant() if limit is None or idx.shape[1] <= limit else contextlib.nullcontext():
        return model(idx, input_pos=input_pos, last_only=True, **padded)[:, -1]


@torch.inference_mode()
def decode_one(model: nn.Module, cur: Tensor, input_pos: Tensor) -> Tensor:
    """One token per row, cur (B,), at position input_pos (1,) -> logits (B, V)."""
    return model(cur[:, None], input_pos=input_pos, last_only=True)[:, -1]


# --- the token loop ---


def _prompt_batch(prompt_ids: Sequence[int] | Tensor, num_samples: int, vocab_size: int,
                  device: torch.device) -> Tensor:
    """A list or 1-D tensor becomes num_samples equal rows; each row of a (B, T0) tensor is
    repeated num_samples times. Ids are checked here, where the message can say what is wrong."""
    idx = torch.as_tensor(prompt_ids, dtype=torch.long)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise GPTSmallError(f"the prompt must hold at least one token per row, got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise GPTSmallError(f"prompt token ids must be in [0, {vocab_size}), got {int(idx.min())}..{int(idx.max())}")
    return idx.repeat_interleave(num_samples, dim=0).to(device)


def generate_tokens(model: nn.Module, prompt_ids: Sequence[int] | Tensor, *, max_new_tokens: int,
                    num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                    stop: Callable[[Tensor], Tensor] | None = None,
                    banned_ids: Sequence[int] = (), keep: int | str | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,) int64, up to max_new_tokens times.

    `seed=None` draws from torch's global RNG (so `torch.manual_seed` governs it); an int seeds a
    private generator on the model's device. The repetition penalty looks at every token of the
    row so far, prompt included (as CTRL and Hugging Face do). `stop(new_ids (B,)) -> bool (B,)`
    marks rows as finished, e.g. `lambda t: t == eos_id`; the loop ends when all rows are.
    `banned_ids` are never sampled (a char tokenizer's `<unk>`, which stands for no character).
    `keep` is the window rule's (module docstring). Arguments are checked here, at the call, not
    at the first `next()`.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("num_samples", num_samples)
    kept = window_keep(model.config.block_size, keep)
    device = next(model.parameters()).device
    idx = _prompt_batch(prompt_ids, num_samples, model.config.vocab_size, device)
    generator = None
    limits.check_seed(seed)
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return _token_loop(model, idx, max_new_tokens, generator, stop,
                       dict(temperature=temperature, top_k=top_k, top_p=top_p), repetition_penalty,
                       list(banned_ids), kept)


class Window:
    """The window rule over one batch of rows that move in step: where the cache's tokens start
    in the sequence, and the forward pass that gives the next logits (module docstring)."""

    def __init__(self, model: nn.Module, keep: int, device: torch.device):
        self.model, self.keep = model, keep
        self.size = model.config.block_size
        self.start = 0  # sequence index of the token at cache position 0
        self.positions = torch.arange(self.size, device=device)  # sliced, never rebuilt

    def prefill(self, seq: Tensor, T: int) -> Tensor:
        """Prefill a prompt seq[:, :T] (cropped to the window's last tokens) -> logits (B, V)."""
        self.start = max(0, T - self.size)  # a prompt longer than the window is cropped, as nanoGPT does
        return prefill(self.model, seq[:, self.start:T], self.positions[:T - self.start])

    def next_logits(self, seq: Tensor, T: int) -> Tensor:
        """seq[:, T] was just appended: the logits (B, V) of the token after it."""
        if T - self.start < self.size:  # room in the cache: decode the new token at its position
            return decode_one(self.model, seq[:, T], self.positions[T - self.start:T - self.start + 1])
        self.start = T - self.keep  # full: keep the last `keep` tokens and the new one, at 0..keep
        return prefill(self.model, seq[:, self.start:T + 1], self.positions[:self.keep + 1])


def _token_loop(model: nn.Module, idx: Tensor, max_new_tokens: int, generator: torch.Generator | None,
                stop: Callable[[Tensor], Tensor] | None, sampling: dict, repetition_penalty: float,
                banned_ids: list[int] | None = None, keep: int | None = None) -> Iterator[Tensor]:
    B, T0 = idx.shape
    total = T0 + max_new_tokens
    was_training = model.training
    model.eval()
    try:
        # inference_mode is entered per step, never around a `yield`: it is thread-local state
        # and would leak into the caller's code while the generator is suspended.
        with torch.inference_mode():
            seq = torch.empty(B, total, dtype=torch.long, device=idx.device)  # prompt + new tokens
            seq[:, :T0] = idx
            model.setup_kv_cache(B, min(total, model.config.block_size))
            window = Window(model, window_keep(model.config.block_size, keep), idx.device)
            logits = window.prefill(seq, T0)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for T in range(T0, total):  # T tokens so far; the new one goes at index T
            with torch.inference_mode():
                if banned_ids:
                    logits[:, banned_ids] = float("-inf")
                if repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, seq[:, :T], repetition_penalty)
                cur = sample(logits, generator=generator, **sampling)  # (B,)
                seq[:, T] = cur
            yield cur
            if stop is not None:
                with torch.inference_mode():
                    done |= stop(cur)
                    if bool(done.all()):
                        return
            if T + 1 == total:
                return
            with torch.inference_mode():
                logits = window.next_logits(seq, T)
    finally:
        model.clear_kv_cache()
        model.train(was_training)


@torch.inference_mode()
def forced_log_prob(model: nn.Module, ids: Sequence[int] | Tensor, *, keep: int | str | None = None) -> tuple[float, int]:
    """Teacher-force ids (a 1-D sequence) through the generator's window rule from its first token:
    (sum of log p(ids[t] | what the generator would have in its window), number of targets).
    The mean is the loss `eval` reports at stride block_size - keep (module docstring) on a text of
    1 + block_size + k * stride tokens; on other lengths eval's last window ends at the text's end,
    so its last few targets get more context than the generator gives them."""
    seq = torch.as_tensor(ids, dtype=torch.long, device=next(model.parameters()).device)[None]
    n = seq.shape[1]
    if n < 2:
        raise GPTSmallError(f"need at least 2 tokens to score, got {n}")
    was_training = model.training
    model.eval()
    try:
        model.setup_kv_cache(1, min(n, model.config.block_size))
        window = Window(model, window_keep(model.config.block_size, keep), seq.device)
        logits, total = window.prefill(seq, 1), 0.0
        for T in range(1, n):
            total += float(torch.log_softmax(logits.double(), dim=-1)[0, seq[0, T]])
            if T + 1 < n:
                logits = window.next_logits(seq, T)
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    return total, n - 1


# --- text at the edge ---


def _finish(text: str, lines: int | None, stop: str | None) -> tuple[str, bool]:
    """Cut a continuation right after its `lines`-th newline or after the first `stop`, whichever
    comes first; say whether it was cut (the sample is finished)."""
    end = None
    if lines is not None:
        k = -1
        for _ in range(lines):
            k = text.find("\n", k + 1)
            if k < 0:
                break
        else:
            end = k + 1
    if stop is not None:
        k = text.find(stop)
        if k >= 0:
            end = k + len(stop) if end is None else min(end, k + len(stop))
    return (text, False) if end is None else (text[:end], True)


def generate_text(model: nn.Module, tokenizer: TextTokenizer, prompt: str, *, max_new_tokens: int = 500,
                  lines: int | None = None, stop: str | None = None, num_samples: int = 1,
                  temperature: float = limits.DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float = 1.0, seed: int | None = None,
                  stream: Callable[[int, str], None] | None = None, keep: int | str | None = None) -> list[str]:
    """Sample num_samples continuations of `prompt`; return each as prompt + continuation.

    An empty prompt starts from "\\n" (the corpus has one verse line per row), which is not part of
    the returned text. `lines=N` ends a sample right after the N-th newline of its continuation;
    `stop` ends it right after the first occurrence of the stop string, which is kept (like the
    newline of `lines`). A stop string that straddles the prompt and the continuation is not seen.
    A finished sample stops growing and streaming; the loop ends when all are finished or after
    max_new_tokens. `stream(i, text)` receives sample i's text as it grows; the pieces concatenate
    to the continuation. `keep` is the window rule's (module docstring). A character still incomplete (decoded as U+FFFD, as when a byte-level
    BPE token splits UTF-8) is held back until it completes or the sample ends.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("num_samples", num_samples)
    _check_count("lines", lines)
    if stop is not None:
        limits.check_text(stop, "stop", max_chars=limits.MAX_STOP_CHARS)
    ids = tokenizer.encode(prompt_text(prompt), unknown="error")  # names an unknown character

    new_ids: list[list[int]] = [[] for _ in range(num_samples)]
    texts = [""] * num_samples
    emitted = [0] * num_samples  # characters of texts[i] already streamed
    finished = [False] * num_samples

    def emit(i: int, flush: bool) -> None:
        if stream is not None and len(texts[i]) > emitted[i] and (flush or not texts[i].endswith(_REPLACEMENT)):
            stream(i, texts[i][emitted[i]:])
            emitted[i] = len(texts[i])

    tokens = generate_tokens(model, ids, max_new_tokens=max_new_tokens, num_samples=num_samples,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed, keep=keep,
                             banned_ids=[u] if (u := getattr(tokenizer, "unk_id", None)) is not None else [])
    try:
        for cur in tokens:
            for i, token in enumerate(cur.tolist()):
                if finished[i]:
                    continue
                new_ids[i].append(token)
                # Decoding the whole continuation (not the token alone) lets split characters join.
                texts[i], finished[i] = _finish(tokenizer.decode(new_ids[i]), lines, stop)
                emit(i, flush=finished[i])
            if all(finished):
                break
    finally:
        tokens.close()  # restores the model's mode and frees the cache now, not at garbage collection
    for i in range(num_samples):
        emit(i, flush=True)
    return [prompt + text for text in texts]
