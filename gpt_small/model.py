"""The GPT: a decoder-only transformer of pre-norm blocks, nothing else.

Names follow nanoGPT and Hugging Face's GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`,
...), so weights map one to one onto `GPT2LMHeadModel` (whose Conv1D stores them transposed).
The model knows nothing about files, devices, DDP or compile: those wrap it from outside.

Shapes: B batch, T time (tokens), C = n_embd, nh = n_head, hs = head size.

KV cache (gpt-fast style; kv_cache.py holds it, its row operations and `Placement`):
`setup_kv_cache(batch_size, max_seq_len)` preallocates it; `forward(idx, input_pos=pos)` writes the
new keys/values at `pos`, (T,) for every row or (B, T) each row its own, and attends to everything
cached up to there.
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import GPTConfig
from .kv_cache import KVCache, ModelCache, Placement, build_cache
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

    def forward(self, x: Tensor, rope: RotaryEmbedding | None, where: Placement | None) -> Tensor:
        """where: the placement of x's tokens in the KV cache, or None to run without the cache."""
        B, T, C = x.shape
        # (B, T, 3C) -> q, k, v, each (B, nh, T, hs): views, no copies
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout_p if self.training else 0.0
        if where is None or where.shared:  # every row at the same positions: one batched call
            pos = torch.arange(T, device=x.device) if where is None else where.pos
            q, k = self._norm_rope(q, k, rope, pos, T if where is None else where.end)
            if where is not None:
                k, v = self.kv_cache.update(where.starts[0], k, v)  # (B, nh, start + T, hs)
            y = ops.causal_attention(q, k, v, p)  # (B, nh, T, hs)
        else:
            # Each row alone, over exactly its own tokens (row b's n tokens sit at x[i, t:t+n], as
            # where.pack left them), through the very calls a lone sequence makes: one padded,
            # masked batch would sum in another order and change the samples.
            y = torch.empty_like(q)
            for b, (s, n) in enumerate(zip(where.starts, where.lengths)):
                i, t = where.segment(b)
                qb, kb = self._norm_rope(q[i:i + 1, :, t:t + n], k[i:i + 1, :, t:t + n], rope, where.row_pos(b), s + n)
                kb, vb = self.kv_cache.update(s, kb, v[i:i + 1, :, t:t + n], row=b)  # (1, nh, s + n, hs)
                y[i:i + 1, :, t:t + n] = ops.causal_attention(qb, kb, vb, p)
        y = y.transpose(1, 2).reshape(B, T, C)  # a view when T = 1
        return ops.dropout(self.c_proj(y), p, self.training)

    def _norm_rope(self, q: Tensor, k: Tensor, rope: RotaryEmbedding | None, pos: Tensor,
                   end: int) -> tuple[Tensor, Tensor]:
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q, k, pos, end)
        return q, k


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

    def forward(self, x: Tensor, rope: RotaryEmbedding | None, where: Placement | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, where)
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
        idx, before = idx.long(), before.long()  # the hash reaches vocab_size * buckets: past int32 for large tables
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
                lengths: Tensor | None = None, last_only: bool = False) -> Tensor: ...
    @overload
    def forward(self, idx: Tensor, targets: Tensor, *, input_pos: Tensor | None = None,
                lengths: Tensor | None = None, last_only: bool = False) -> tuple[Tensor, Tensor]: ...

    def forward(self, idx, targets=None, *, input_pos=None, lengths=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean cross-entropy.

        input_pos: where the tokens go in the KV cache (kv_cache.Placement): (T,) the same
        consecutive positions for every row, or (B, T) each row's own; None runs without the cache
        at positions 0..T-1. lengths (B,), with a (B, T) input_pos: the real tokens of each row of a
        padded batch (the rest is padding, never cached). last_only computes the logits of each
        row's last (real) token alone, (B, 1, vocab): generation needs no others, and the head is
        the largest matmul of a model with a big vocabulary.
        """
        B, T = idx.shape
        where = None
        if input_pos is not None:
            if self._kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_kv_cache() first")
            where = Placement(input_pos, lengths, B, T)
        end = T if where is None else where.end  # 1 + the last position; only a learned table has an end
        if self.config.pos_encoding == "learned" and end > self.config.block_size:
            raise ValueError(f"position {end - 1} is past the learned table of block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "ngram" in self.transformer:
            x = x + self._ngram_embeddings(idx, where)
        if self.config.pos_encoding == "sinusoidal":
            # Vaswani et al. 3.4: embeddings times sqrt(d_model). Without it the fixed table (values
            # of +-1) drowns token embeddings initialised at std 0.02 (docs/results.md's study).
            x = x * self._emb_scale
        if "wpe" in self.transformer:
            pos = torch.arange(T, device=idx.device) if where is None else where.pos  # (T,) or (B, T)
            x = x + self.transformer.wpe(pos).to(x.dtype)
        x = ops.dropout(x, self.config.dropout, self.training)
        if where is not None:
            x = where.pack(x)  # padded rows: their real tokens in one row, (1, N, C)
        # Decoding one token per row, the CPU backend runs every block in one C call
        # (ops/decoder.py); it computes what the loop below does, and returns None where it can't.
        fused = ops.decode_blocks(self, x, where) if where is not None and T == 1 else None
        if fused is not None:
            x = fused
        else:
            for block in self.transformer.h:
                x = block(x, self.rope, where)
        if last_only:
            x = x[:, -1:] if where is None else where.last(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if where is not None and not last_only:
            logits = where.unpack(logits)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _ngram_embeddings(self, idx: Tensor, where: Placement | None) -> Tensor:
        """The n-gram embeddings of idx; with the KV cache, the tokens before a chunk come from
        the cache's history (padding at position 0), and the history moves on."""
        ngram, cache = self.transformer.ngram, self._kv_cache
        if where is None:
            return ngram(idx, torch.full((idx.shape[0], ngram.context), ngram.pad, dtype=idx.dtype, device=idx.device))
        before = cache.tokens_before(where, ngram.pad)
        out = ngram(idx, before)
        cache.remember(before, idx, where)  # after the lookup: `before` may be a view of the history
        return out

    # --- KV cache for generation (its row operations: kv_cache.ModelCache) ---

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a key/value cache per layer for `batch_size` sequences of `max_seq_len` tokens."""
        if self.config.pos_encoding == "learned" and max_seq_len > self.config.block_size:
            max_seq_len = self.config.block_size  # learned positions never go further
        c, p = self.config, self.transformer.wte.weight
        context = self.transformer.ngram.context if "ngram" in self.transformer else 0  # tokens n-grams look back
        self.kv_cache = build_cache(batch_size, max_seq_len, c.n_layer, c.n_head, c.head_size, context,
                                    dtype or p.dtype, p.device)

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
