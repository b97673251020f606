"""One decoding step through every block of the model in one C call (csrc/decode.c `decode_blocks`).

A decoding step runs a dozen small operations per block (two LayerNorms, four products, the cache
write, attention, the activation, two residual adds), and Python's cost per operation (a module
call, a view, a ctypes call) is paid for each. With bf16 or int8 weights at GPT-2 small's size
that cost outgrows the weight reads themselves (docs/decoding.md), so the CPU backend runs the
whole stack of blocks in C, in one parallel region: the products through the same kernel as
`skinny_linear`, attention through the same code as `decode_attention`.

`decode_blocks(model, x, where)` returns what `for block in model.transformer.h: x = block(...)`
returns for one new token per row (x (B, 1, C) placed by `where`, the forward's
kv_cache.Placement: row b at position where.starts[b]; the KV cache set up), to fp32 rounding, or None where it does not apply; model.py then runs its blocks one by one.
It applies on the CPU at inference (no autograd, eval mode) for any number of rows (a served
batch, a verse form's candidates; 4 at a time through the products, so a row's arithmetic does
not depend on the rows beside it), fp32 activations
and KV cache, fp32/bf16/int8 Linear weights, LayerNorms with or without bias, ReLU, GELU or
ReLU², with or without RoPE and QK-norm: every configuration GPTConfig can build.

The C side reads weights and caches through pointers, so the pointers are gathered once per KV
cache (a generation, a served batch) and kept while that cache lives; the weights are those the
model holds when its cache is set up. tests/test_decoder.py holds the result equal to the blocks'.
"""

from __future__ import annotations

import ctypes
import weakref
from ctypes import POINTER, c_float, c_int, c_long, c_void_p

import torch
from torch import Tensor, nn

from ..kv_cache import Placement
from . import kernels

MAX_ROWS = 64  # rows the scratch space is first sized for (it grows for more)
_W_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # csrc/decode.c's W_F32, W_BF16, W_I8
_ACTIVATIONS = {"relu": 0, "gelu": 1, "relu2": 2}


class _Linear(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("scale", c_void_p), ("bias", c_void_p), ("n", c_long), ("k", c_long),
                ("type", c_int)]


class _Block(ctypes.Structure):
    _fields_ = ([(name, c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "qn_w", "qn_b", "kn_w", "kn_b")]
                + [(name, _Linear) for name in ("attn", "attn_proj", "fc", "mlp_proj")]
                + [("k_cache", c_void_p), ("v_cache", c_void_p)])


class _Decoder(ctypes.Structure):
    _fields_ = [("n_layer", c_int), ("n_head", c_int), ("head_size", c_int), ("act", c_int), ("eps", c_float),
                ("cache_len", c_long), ("rope_cos", c_void_p), ("rope_sin", c_void_p), ("blocks", POINTER(_Block))]


class _Unsupported(Exception):
    pass


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(module: nn.Module, keep: list[Tensor]) -> _Linear:
    w, bias, scale = module.weight, module.bias, getattr(module, "scale", None)
    if (w.dtype not in _W_TYPES or not w.is_contiguous() or (scale is not None) != (w.dtype == torch.int8)
            or any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous()) for t in (bias, scale))):
        raise _Unsupported
    keep += [t for t in (w, bias, scale) if t is not None]
    return _Linear(w.data_ptr(), _ptr(scale), _ptr(bias), w.shape[0], w.shape[1], _W_TYPES[w.dtype])


def _norm(module: nn.Module | None, width: int, eps: float, keep: list[Tensor]) -> tuple[int | None, int | None]:
    if module is None:
        return None, None
    if (not isinstance(module, nn.LayerNorm) or module.normalized_shape != (width,) or module.eps != eps
            or module.weight is None or module.weight.dtype != torch.float32
            or (module.bias is not None and module.bias.dtype != torch.float32)):
        raise _Unsupported
    keep += [t for t in (module.weight, module.bias) if t is not None]
    return module.weight.data_ptr(), _ptr(module.bias)


class _Prepared:
    """The C structs for one model and one set of KV caches, and what they point into."""

    def __init__(self, model: nn.Module, caches: list):
        c = model.config
        blocks = list(model.transformer.h)
        eps = blocks[0].ln_1.eps
        if caches[0].k.shape[2] > kernels.MAX_CACHED or c.activation not in _ACTIVATIONS:
            raise _Unsupported
        keep: list[Tensor] = []
        structs = (_Block * len(blocks))()
        for s, block, cache in zip(structs, blocks, caches):
            if not (cache.k.dtype == cache.v.dtype == torch.float32 and cache.k.is_contiguous()
                    and cache.v.is_contiguous()):
                raise _Unsupported
            attn, mlp = block.attn, block.mlp
            s.ln1_w, s.ln1_b = _norm(block.ln_1, c.n_embd, eps, keep)
            s.ln2_w, s.ln2_b = _norm(block.ln_2, c.n_embd, eps, keep)
            s.qn_w, s.qn_b = _norm(attn.q_norm, c.head_size, eps, keep)
            s.kn_w, s.kn_b = _norm(attn.k_norm, c.head_size, eps, keep)
            s.attn, s.attn_proj = _linear(attn.c_attn, keep), _linear(attn.c_proj, keep)
            s.fc, s.mlp_proj = _linear(mlp.c_fc, keep), _linear(mlp.c_proj, keep)
            C, hidden = c.n_embd, s.fc.n  # the shapes the C side assumes, so it never reads past a buffer
            if ((s.attn.n, s.attn.k, s.attn_proj.n, s.attn_proj.k, s.fc.k, s.mlp_proj.n, s.mlp_proj.k)
                    != (3 * C, C, C, C, C, C, hidden)
                    or c.n_head * c.head_size != C or cache.k.shape[1:] != (c.n_head, caches[0].k.shape[2], c.head_size)
                    or cache.v.shape != cache.k.shape):
                raise _Unsupported
            s.k_cache, s.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        self.rope = model.rope
        self.rope_tables = None
        self.decoder = _Decoder(len(blocks), c.n_head, c.head_size, _ACTIVATIONS[c.activation], eps,
                                caches[0].k.shape[2], None, None, structs)
        self.structs, self.keep = structs, keep
        self.scratch_per_row = 6 * c.n_embd + max(s.fc.n for s in structs)
        self.scratch = torch.empty(MAX_ROWS * self.scratch_per_row)

    def set_rope(self, end: int) -> None:
        """Point at RoPE tables that reach position end - 1 (they grow, so they may move)."""
        cos, sin = self.rope.tables(end)
        if self.rope_tables is None or self.rope_tables[0] is not cos:
            self.rope_tables = (cos, sin)
            self.decoder.rope_cos, self.decoder.rope_sin = cos.data_ptr(), sin.data_ptr()


# model -> (its KV caches, weakly; their _Prepared, or None where the model is not supported)
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_blocks(model: nn.Module, x: Tensor, where: Placement) -> Tensor | None:
    """The blocks' output for x (B, 1, C), row b at position where.starts[b], or None."""
    B, T, C = x.shape
    positions = where.starts
    if T != 1 or len(positions) != B or x.dtype != torch.float32 or model.training or not kernels.available():
        return None
    caches = [block.attn.kv_cache for block in model.transformer.h]
    if caches[0] is None or caches[0].k.shape[0] < B:
        return None
    refs, prepared = _prepared.get(model, ((), None))
    if len(refs) != len(caches) or not all(ref() is cache for ref, cache in zip(refs, caches)):
        try:
            prepared = _Prepared(model, caches)
        except _Unsupported:
            prepared = None
        _prepared[model] = ([weakref.ref(cache) for cache in caches], prepared)
    if prepared is None:
        return None
    if prepared.scratch.numel() < B * prepared.scratch_per_row:  # more rows than ever before
        prepared.scratch = torch.empty(B * prepared.scratch_per_row)
    if prepared.rope is not None:
        prepared.set_rope(max(positions) + 1)
    out = x.reshape(B, C).clone()
    status = kernels.decode_blocks(ctypes.byref(prepared.decoder), out, positions, prepared.scratch)
    if status != 0:
        raise ValueError(f"decode_blocks refused rows {B} at positions {positions} "
                         f"(a cache of {prepared.decoder.cache_len})")
    return out.view(B, 1, C)
