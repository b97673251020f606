"""The KV cache of one attention layer: preallocated key and value buffers, written in place.

`update(start, k, v)` writes T new positions of every row (prefill, or decoding a batch in step);
`update_rows(pos, k, v)` writes one new position per row, row b at pos[b]: continuous batching
(gpt_small/serve), where the rows of one batch are at different points of their sequences and
each attends to its own cache prefix exactly as it would alone. `rows(lo, hi)` is a view of some
rows (a new sequence is prefilled alone into its row).
"""

from __future__ import annotations

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
