"""The KV cache: preallocated key and value buffers per attention layer, written in place, and
the model-wide cache that holds them with the n-gram history (the row operations live here).

`KVCache.update(start, k, v)` writes T new positions of every row (prefill, or decoding a batch in
step); `update_rows(pos, k, v)` writes one new position per row, row b at pos[b]: continuous
batching (gpt_small/serve), where the rows of one batch are at different points of their sequences
and each attends to its own cache prefix exactly as it would alone.

`ModelCache` is what `GPT.setup_kv_cache` builds and `GPT.kv_cache` holds: `rows(lo, hi)` is a
view of some rows (a new sequence is prefilled alone into its row: `with rows_of(model, i, i+1)`),
`copy_row` moves a row's prefix (the serve engine keeps its live rows packed), `broadcast_row`
copies one row into all (a verse form's candidates share a prefilled prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_head: int, max_seq_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at positions start..start+T-1; return the cache up to there.

        A slice assignment, not an index_put with a position tensor: faster for one token, and the
        end is a Python int, so no device-to-host read per layer.
        """
        B, end = k.shape[0], start + k.shape[2]
        kc, vc = (self.k, self.v) if B == self.k.shape[0] else (self.k[:B], self.v[:B])
        kc.narrow(2, start, end - start).copy_(k)  # narrow + copy_: fewer dispatches than [..., a:b] =
        vc.narrow(2, start, end - start).copy_(v)
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def update_rows(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write row b's one new k, v (B, nh, 1, hs) at its own position pos[b]; return rows :B."""
        B = k.shape[0]
        for b, p in enumerate(pos.tolist()):  # B small copies: one index_put over the (row,
            self.k[b, :, p].copy_(k[b, :, 0])  # position) pairs was far slower at B = 8
            self.v[b, :, p].copy_(v[b, :, 0])
        return self.k[:B], self.v[:B]

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


@contextmanager
def rows_of(model: nn.Module, lo: int, hi: int) -> Iterator[None]:
    """Within the block, `model`'s KV cache is rows lo..hi-1 of its current one."""
    full = model.kv_cache
    model.kv_cache = full.rows(lo, hi)
    try:
        yield
    finally:
        model.kv_cache = full
