"""The KV cache: preallocated key and value buffers per attention layer, written in place, the
model-wide cache that holds them with the n-gram history, and `Placement`, where the tokens of
one cached forward pass go (the row operations of serving live here, not in the model).

`Placement(input_pos, lengths, B, T)` reads a forward's `input_pos` once (gpt-fast's name):
- (T,): every row's tokens at these consecutive positions (a prefill, a decoding step in lockstep,
  a chunk after a cached prefix); the rows move together (`shared`).
- (B, T): row b's tokens at input_pos[b] (consecutive), each row at its own point of its
  sequence: continuous batching (gpt_small/serve) decodes one token per row this way, and a batched
  prefill runs several prompts padded to the longest, with `lengths` (B,) giving each row's real
  tokens. The padding only fills the (B, T) layout of idx: after the embeddings the model packs
  the real tokens of all rows into one row (`pack`), so no product spends time on padding, and
  nothing of the padding is cached or attended to.
The model then treats each row of a (B, T) placement alone (attention over exactly its own
tokens, the same call with the same shapes as for the sequence alone, `segment`), so a row's
result does not depend on the rows beside it (model.py, ops' row-invariant mode).

`KVCache.update(start, k, v, row=None)` writes T new positions of every row, or of one row.
`ModelCache.rows(lo, hi)` is a view of some rows (`with rows_of(model, i, i+1)` prefills into row
i alone), `copy_row` moves a row's prefix (the serve engine keeps its live rows packed),
`broadcast_row` copies one row into all (a verse form's candidates share a prefilled prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class Placement:
    """Where the tokens of one cached forward pass go (module docstring). Built once per forward,
    with one device-to-host read; `starts` and `lengths` are then Python ints per row."""

    def __init__(self, input_pos: Tensor, lengths: Tensor | None, B: int, T: int):
        if input_pos.dim() == 1:
            if input_pos.shape != (T,) or lengths is not None:
                raise ValueError(f"input_pos (T,) must hold the {T} positions of idx, without lengths; "
                                 f"got {tuple(input_pos.shape)}")
            start = int(input_pos[0])  # the one device-to-host read
            self.shared, self.starts, self.lengths = True, [start] * B, [T] * B
            self.pos = input_pos  # (T,)
        else:
            if input_pos.shape != (B, T):
                raise ValueError(f"per-row input_pos must be (B, T) = {(B, T)} like idx, got {tuple(input_pos.shape)}")
            if lengths is None:
                lengths = torch.full((B,), T, dtype=torch.long, device=input_pos.device)
            elif lengths.shape != (B,):
                raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
            host = torch.cat((input_pos[:, 0], lengths.to(input_pos.device))).tolist()  # the one read
            self.shared, self.starts, self.lengths = False, host[:B], host[B:]
            if not all(1 <= n <= T for n in self.lengths):
                raise ValueError(f"each row's length must be 1..{T}, got {self.lengths}")
            self._lengths = lengths = lengths.to(input_pos.device)
            # padding sits at its row's last real position: a position the row has, its output unused
            last = input_pos[:, :1] + lengths[:, None] - 1
            self.pos = input_pos if min(self.lengths) == T else torch.minimum(input_pos, last)  # (B, T)
        self.end = max(s + n for s, n in zip(self.starts, self.lengths))  # 1 + the last position used
        self.packed = min(self.lengths) < T  # padding: the model runs the rows packed into one (pack)
        if self.packed:
            self._real = torch.arange(T, device=input_pos.device)[None] < self._lengths[:, None]  # (B, T)
            self._offsets = [sum(self.lengths[:b]) for b in range(B)]  # row b's first token, packed
        self._shape = (B, T)

    def pack(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> the real tokens of every row in one row, (1, sum of lengths, C)."""
        return x[self._real][None] if self.packed else x

    def unpack(self, y: Tensor) -> Tensor:
        """The inverse of pack for a per-token output (1, N, V) -> (B, T, V), 0 at the padding."""
        if not self.packed:
            return y
        out = y.new_zeros(*self._shape, *y.shape[2:])
        out[self._real] = y[0]
        return out

    def segment(self, b: int) -> tuple[int, int]:
        """Where row b's tokens are in the (packed) activations: (row of x, first token)."""
        return (0, self._offsets[b]) if self.packed else (b, 0)

    def last(self, x: Tensor) -> Tensor:
        """Each row's last real token of the (packed) activations x -> (B, 1, C)."""
        if not self.packed:
            return x[:, -1:]
        ends = torch.tensor([o + n - 1 for o, n in zip(self._offsets, self.lengths)], device=x.device)
        return x[0, ends][:, None]

    def row_pos(self, b: int) -> Tensor:
        """Row b's real positions (n,)."""
        return self.pos if self.shared else self.pos[b, :self.lengths[b]]


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_head: int, max_seq_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor, row: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at positions start..start+T-1 of rows :B, or (1, nh, T, hs)
        of the one row `row`; return those rows of the cache up to there.

        A slice assignment, not an index_put with a position tensor: faster for one token, and the
        end is a Python int, so no device-to-host read per layer.
        """
        B, end = k.shape[0], start + k.shape[2]
        if row is not None:
            kc, vc = self.k[row:row + 1], self.v[row:row + 1]
        else:
            kc, vc = (self.k, self.v) if B == self.k.shape[0] else (self.k[:B], self.v[:B])
        kc.narrow(2, start, end - start).copy_(k)  # narrow + copy_: fewer dispatches than [..., a:b] =
        vc.narrow(2, start, end - start).copy_(v)
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A cache whose buffers are views of rows lo..hi-1 of this one (writes go through)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[lo:hi], persistent=False)
        view.register_buffer("v", self.v[lo:hi], persistent=False)
        return view


class ModelCache:
    """Every layer's KVCache and, for an n-gram model, the last tokens fed per row (`history`,
    (B, context)), which the next chunk's n-grams read."""

    def __init__(self, layers: list[KVCache], history: Tensor | None):
        self.layers, self.history = layers, history

    @property
    def capacity(self) -> int:
        """Positions each row holds: the most a decode may reach."""
        return self.layers[0].k.shape[2]

    def rows(self, lo: int, hi: int) -> "ModelCache":
        """Rows lo..hi-1 as a cache of their own (views: writes go through)."""
        return ModelCache([c.rows(lo, hi) for c in self.layers],
                          None if self.history is None else self.history[lo:hi])

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src (and its n-gram history) to row dst."""
        for c in self.layers:
            c.k[dst, :, :length].copy_(c.k[src, :, :length])
            c.v[dst, :, :length].copy_(c.v[src, :, :length])
        if self.history is not None:
            self.history[dst].copy_(self.history[src])

    def broadcast_row(self, src: int, length: int) -> None:
        """Copy the first `length` positions of row src (and its history) to every row."""
        for c in self.layers:
            c.k[:, :, :length] = c.k[src:src + 1, :, :length]
            c.v[:, :, :length] = c.v[src:src + 1, :, :length]
        if self.history is not None:
            self.history[:] = self.history[src:src + 1]

    def tokens_before(self, where: Placement, pad: int) -> Tensor:
        """(B, context): the tokens before each row's first new token; `pad` for a row at 0."""
        B = len(where.starts)
        if where.shared and where.starts[0] > 0:
            return self.history[:B]
        at_zero = torch.tensor([s == 0 for s in where.starts], device=self.history.device)[:, None]
        return torch.where(at_zero, pad, self.history[:B])

    def remember(self, before: Tensor, idx: Tensor, where: Placement) -> None:
        """Keep each row's last `context` tokens after this forward (its real ones, not padding)."""
        B, k = idx.shape[0], self.history.shape[1]
        tokens = torch.cat((before, idx), dim=1)  # (B, context + T)
        if not where.packed:  # no padding: every row's last tokens
            self.history[:B] = tokens[:, -k:]
        else:
            index = where._lengths[:, None] + torch.arange(k, device=idx.device)  # row b: tokens n_b..n_b+k-1
            self.history[:B] = tokens.gather(1, index)


def build_cache(batch_size: int, max_seq_len: int, n_layer: int, n_head: int, head_size: int,
                ngram_context: int, dtype: torch.dtype, device: torch.device) -> ModelCache:
    """A ModelCache of zeros: n_layer KVCaches, and a history if the model has n-grams (context > 0)."""
    layers = [KVCache(batch_size, n_head, max_seq_len, head_size, dtype, device) for _ in range(n_layer)]
    history = (torch.zeros(batch_size, ngram_context, dtype=torch.long, device=device)
               if ngram_context else None)
    return ModelCache(layers, history)


@contextmanager
def rows_of(model: nn.Module, lo: int, hi: int) -> Iterator[None]:
    """Within the block, `model`'s KV cache is rows lo..hi-1 of its current one."""
    full = model.kv_cache
    model.kv_cache = full.rows(lo, hi)
    try:
        yield
    finally:
        model.kv_cache = full
