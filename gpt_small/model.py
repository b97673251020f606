"""The GPT: a decoder-only transformer of pre-norm blocks, nothing else.

Names follow nanoGPT and Hugging Face's GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`,
...), so weights map one to one onto `GPT2LMHeadModel` (whose Conv1D stores them transposed).
The model knows nothing about files, devices, DDP or compile: those wrap it from outside.

Shapes: B batch, T time (tokens), C = n_embd, nh = n_head, hs = head size.

KV cache (gpt-fast style, kv_cache.py): `setup_kv_cache(batch_size, max_seq_len)` preallocates
a key and value buffer per layer (`model.kv_cache`, whose row operations live in kv_cache.py); `forward(idx, input_pos=pos)` then writes the new keys/values at
`pos` and attends to everything cached up to the last position; `input_pos` (B, 1) decodes one
token per row, each at its own position (continuous batching, gpt_small/serve).
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import GPTConfig
from .kv_cache import KVCache, ModelCache
from .positional import LearnedPositions, RotaryEmbedding, SinusoidalPositions


class Linear(nn.Linear):
    """nn.Linear through the ops layer (the CPU's decoding kernel, or a bf16/int8 weight)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.dropout_p = config.dropout
        self.c_attn = Linear(C, 3 * C, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(C, C, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.LayerNorm(self.head_size, bias=config.bias)
            self.k_norm = nn.LayerNorm(self.head_size, bias=config.bias)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, pos: Tensor, rope: RotaryEmbedding | None, start: int | Tensor | None) -> Tensor:
        """start: the first position of x in the KV cache, or None to run without the cache, or
        (B,) per-row positions of one token per row (continuous batching)."""
        B, T, C = x.shape
        # (B, T, 3C) -> q, k, v, each (B, nh, T, hs): views, no copies
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if isinstance(start, Tensor):  # pos (B, 1): (B, 1, 1) rows broadcast over heads
                q, k = rope(q, k, pos[:, :, None], int(start.max()) + 1)
            else:
                q, k = rope(q, k, pos, (start or 0) + T)
        p = self.dropout_p if self.training else 0.0
        if isinstance(start, Tensor):  # one token per row, row b at position start[b]
            k, v = self.kv_cache.update_rows(start, k, v)  # (B, nh, S, hs)
            # Row by row, each over its own prefix, through the very path a lone sequence takes:
            # a padded batch with a mask would sum in another order and change the samples.
            y = torch.cat([ops.causal_attention(q[b:b + 1], k[b:b + 1, :, :e], v[b:b + 1, :, :e], p)
                           for b, e in enumerate((start + 1).tolist())])  # (B, nh, 1, hs)
        else:
            if start is not None:
                k, v = self.kv_cache.update(start, k, v)  # (B, nh, start + T, hs)
            y = ops.causal_attention(q, k, v, p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # a view when T = 1
        return ops.dropout(self.c_proj(y), p, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.dropout_p = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = ops.gelu(h)  # GPT-2's "gelu_new" (the tanh form)
        else:  # relu2: squared ReLU (Primer, So et al. 2021)
            h = ops.relu2(h)
        return ops.dropout(self.c_proj(h), self.dropout_p, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, pos: Tensor, rope: RotaryEmbedding | None, start: int | Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), pos, rope, start)
        x = x + self.mlp(self.ln_2(x))
        return x


class NgramEmbeddings(nn.Module):
    """Hashed n-gram input embeddings: for n = 2..n_max, a table row for the n tokens ending at each
    position, added to the token embedding. More parameters at the cost of lookups, not matmuls: a
    character model then starts its first block knowing the last few characters, not just one.

    The n-gram t[i-n+1..i] is hashed as sum_j t[i-j] (V + 1)^j mod buckets (V = vocab_size; V itself
    stands for "before the window"), so bigrams of a vocabulary up to sqrt(buckets) - 1 get a row
    each. Positions before the window count as that padding token everywhere (training, evaluation,
    generation with or without the KV cache), so every path computes the same function.
    """

    def __init__(self, vocab_size: int, n_max: int, buckets: int, n_embd: int):
        super().__init__()
        self.pad = vocab_size
        self.buckets = buckets
        self.tables = nn.ModuleList(nn.Embedding(buckets, n_embd) for _ in range(2, n_max + 1))

    @property
    def context(self) -> int:
        """Tokens before the first position that the n-grams reach back to."""
        return len(self.tables)

    def forward(self, idx: Tensor, before: Tensor) -> Tensor:
        """idx (B, T) token ids, before (B, context) the tokens preceding them -> (B, T, C)."""
        k, T = self.context, idx.shape[1]
        tokens = torch.cat((before, idx), dim=1)
        h, base, out = idx % self.buckets, 1, 0
        for i, table in enumerate(self.tables):  # n = i + 2; all mod buckets, so nothing overflows
            base = base * (self.pad + 1) % self.buckets
            h = (h + tokens[:, k - 1 - i:k - 1 - i + T] * base) % self.buckets
            out = out + table(h)
        return out


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(C, bias=config.bias),
        ))
        if config.ngram > 1:
            self.transformer["ngram"] = NgramEmbeddings(config.vocab_size, config.ngram, config.ngram_buckets, C)
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = LearnedPositions(config.block_size, C)
        elif config.pos_encoding == "sinusoidal":
            self.transformer["wpe"] = SinusoidalPositions(config.block_size, C)
        self.rope = (RotaryEmbedding(config.head_size, config.block_size, config.rope_theta)
                     if config.pos_encoding == "rope" else None)
        self._emb_scale = math.sqrt(C)
        self._kv_cache: ModelCache | None = None  # set up for generation (setup_kv_cache)
        self.lm_head = Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.startswith("transformer.ngram."):  # n-grams start silent: at step 0 a plain model
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif "ln" in name or "norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:  # biases
                nn.init.zeros_(p)
        if self.config.pos_encoding == "learned":
            nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=0.01)  # as GPT-2

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the built model (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.config.pos_encoding == "learned":
                n -= self.transformer.wpe.weight.numel()
            if "ngram" in self.transformer:
                n -= sum(p.numel() for p in self.transformer.ngram.parameters())
        return n

    @overload
    def forward(self, idx: Tensor, targets: None = None, *, input_pos: Tensor | None = None,
                last_only: bool = False) -> Tensor: ...
    @overload
    def forward(self, idx: Tensor, targets: Tensor, *, input_pos: Tensor | None = None,
                last_only: bool = False) -> tuple[Tensor, Tensor]: ...

    def forward(self, idx, targets=None, *, input_pos=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean cross-entropy.

        input_pos (T,) are the absolute, consecutive positions of idx when decoding with the KV
        cache; without it the positions are 0..T-1 and no cache is used. input_pos (B, 1) with idx
        (B, 1) gives each row its own position, each >= 1 (continuous batching: rows decode at
        different points of their sequences, all after a prefill). last_only computes the
        logits of the last position alone, (B, 1, vocab): generation needs no others, and the
        head is the largest matmul of a model with a big vocabulary.
        """
        B, T = idx.shape
        start = None
        if input_pos is not None:
            if self.transformer.h[0].attn.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_kv_cache() first")
            pos = input_pos
            if pos.dim() == 2:  # per-row positions, one token each
                if T != 1 or pos.shape != (B, 1):
                    raise ValueError(f"per-row input_pos must be (B, 1) with idx (B, 1), got {tuple(pos.shape)}")
                start = pos[:, 0]
            else:
                start = int(pos[0])  # the one device-to-host read of a decode step
        else:
            # only a learned table has an end; fixed encodings extend (length-extrapolation evaluation)
            if T > self.config.block_size and self.config.pos_encoding == "learned":
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        if "ngram" in self.transformer:  # per-row rows are all past position 0: history, as start >= 1
            x = x + self._ngram_embeddings(idx, 1 if isinstance(start, Tensor) else start)
        if self.config.pos_encoding == "sinusoidal":
            # Vaswani et al. 3.4: embeddings times sqrt(d_model). Without it the fixed table (values
            # of +-1) drowns token embeddings initialised at std 0.02 (docs/results.md's study).
            x = x * self._emb_scale
        if "wpe" in self.transformer:
            last = T - 1 if start is None else int(start.max()) if isinstance(start, Tensor) else start + T - 1
            if isinstance(self.transformer.wpe, LearnedPositions) and last >= self.config.block_size:
                raise ValueError(f"position {last} is past the learned table of {self.config.block_size}")
            x = x + self.transformer.wpe(pos).to(x.dtype)
        x = ops.dropout(x, self.config.dropout, self.training)
        # Decoding one token per row, the CPU backend runs every block in one C call
        # (ops/decoder.py); it computes what the loop below does, and returns None where it can't.
        fused = ops.decode_blocks(self, x, start) if start is not None and T == 1 else None
        if fused is not None:
            x = fused
        else:
            for block in self.transformer.h:
                x = block(x, pos, self.rope, start)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _ngram_embeddings(self, idx: Tensor, start: int | None) -> Tensor:
        """The n-gram embeddings of idx; with the KV cache, the tokens before a chunk come from
        the cache's history (padding at position 0), and the history moves on."""
        ngram = self.transformer.ngram
        B = idx.shape[0]
        history = self._kv_cache.history if start is not None else None
        if start:
            before = history[:B]
        else:
            before = torch.full((B, ngram.context), ngram.pad, dtype=idx.dtype, device=idx.device)
        out = ngram(idx, before)
        if start is not None:  # after the lookup: `before` may be a view of the history
            history[:B] = torch.cat((before, idx), dim=1)[:, -ngram.context:]
        return out

    # --- KV cache for generation (its row operations: kv_cache.ModelCache) ---

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a key/value cache per layer for `batch_size` sequences of `max_seq_len` tokens."""
        if self.config.pos_encoding == "learned" and max_seq_len > self.config.block_size:
            max_seq_len = self.config.block_size  # learned positions never go further
        p = self.transformer.wte.weight
        layers = [KVCache(batch_size, self.config.n_head, max_seq_len, self.config.head_size, dtype or p.dtype,
                          p.device) for _ in self.transformer.h]
        history = None
        if "ngram" in self.transformer:  # the last tokens fed, for the next chunk's n-grams
            history = torch.zeros(batch_size, self.transformer.ngram.context, dtype=torch.long, device=p.device)
        self.kv_cache = ModelCache(layers, history)

    @property
    def kv_cache(self) -> ModelCache | None:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: ModelCache | None) -> None:
        """Install a cache (or None): each block's attention gets its layer."""
        self._kv_cache = cache
        for i, block in enumerate(self.transformer.h):
            block.attn.kv_cache = None if cache is None else cache.layers[i]

    def clear_kv_cache(self) -> None:
        self.kv_cache = None

    @property
    def kv_cache_capacity(self) -> int:
        """Positions the KV cache holds (0 without one): the most a decode may reach."""
        return 0 if self._kv_cache is None else self._kv_cache.capacity
