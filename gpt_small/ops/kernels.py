"""Hand-written kernels for the CPU (csrc/decode.c, csrc/gelu.c) and their loader.

- `skinny_linear`: y = x @ W.T + b for a few rows of x (1-4 in one pass over W, more 4 at a time:
  a short prompt), W in fp32, bf16 or int8 (with a scale per output row; ops/quantize.py makes
  such weights). Decoding multiplies one row of activations
  per sample by every weight matrix, so a token costs a read of all the weights; at the 6x384
  shape (42 MB, more than the L3 cache) that read is the step. torch's fp32 kernels (MKL, oneDNN)
  stream such weights well below the memory bandwidth; this kernel reaches it
  (benchmarks/weight_streaming.py times them all).
- `decode_attention`: one new token's attention over the KV cache, which at batch 8 is as many
  bytes as the weights; faster than SDPA's CPU kernel in cache and out (benchmarks/generate_throughput.py).
- `decode_blocks`: a whole decoding step through every block (LayerNorms, the products above,
  the cache write, attention, activation, residuals) in one call; ops/decoder.py prepares it.
- `gelu_tanh_forward`, `gelu_tanh_backward`: GELU in GPT-2's tanh form, which torch's CPU kernel
  runs slower than the exact GELU; the CPU backend (ops/cpu.py) uses them in training and at
  inference.

The C files are compiled when the CPU backend is chosen (ops/cpu.py `prepare()` calls
`available()`) with the system's C compiler (`cc -O3 -march=native -fopenmp`, about a second)
into `kernels/` of the cache folder (gpt_small/paths.py), keyed by the source, compiler, flags
and CPU, and loaded with ctypes: no build step at install, no torch headers. Without a compiler,
or with `GPT_SMALL_KERNELS=0`, `available()` is False and the CPU backend falls back to torch's
ops (same results to rounding); `describe()` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..device import cpu_flags
from ..paths import cache_dir

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("decode.c", "gelu.c")]
MAX_ROWS = 8  # rows of x skinny_linear takes in one pass over the weights (batch size when decoding)
MAX_CACHED = 65536  # cached positions decode_attention takes
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_state = ""  # "" = not tried yet; else a description of what was loaded or why not


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("GPT_SMALL_KERNELS", "1") == "0":
        return None, "off (GPT_SMALL_KERNELS=0)"
    cc = _compiler()
    if cc is None:
        return None, "off (no C compiler found; set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        # what -march=native depends on: the machine and, on Linux, the CPU's feature flags
        cpu = [platform.machine(), platform.processor(), *cpu_flags()]
        key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), cc, version, *FLAGS, *cpu]).encode())
        lib_path = cache_dir() / "kernels" / f"cpu-{key.hexdigest()[:16]}.so"
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode != 0:
                    first = (done.stderr.strip().splitlines() or ["no message"])[0]
                    return None, f"off ({Path(cc).name} failed: {first})"
                os.replace(tmp, lib_path)  # atomic: concurrent builders agree on one file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"off ({type(e).__name__}: {e})"
    c_int, c_long, ptr = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    lib.skinny_linear.argtypes = lib.skinny_linear_bf16.argtypes = [ptr] * 4 + [c_int, c_long, c_long, c_int]
    lib.skinny_linear_int8.argtypes = [ptr] * 5 + [c_int, c_long, c_long, c_int]
    lib.skinny_linear_bf16.restype = lib.skinny_linear_int8.restype = c_int
    lib.decode_attention.argtypes = [ptr] * 4 + [c_int, c_int] + [c_long] * 6 + [ctypes.c_float, c_int]
    lib.skinny_linear.restype = lib.decode_attention.restype = c_int
    lib.decode_blocks.argtypes = [ptr, ptr, c_int, ptr, ptr, c_int]
    lib.decode_blocks.restype = c_int
    lib.gelu_tanh_forward.argtypes = [ptr, ptr, c_long, c_int]
    lib.gelu_tanh_backward.argtypes = [ptr, ptr, ptr, c_long, c_int]
    lib.gelu_tanh_forward.restype = lib.gelu_tanh_backward.restype = None
    return lib, f"on ({lib_path})"


def available() -> bool:
    """Whether the kernels can run here (builds them on the first call)."""
    global _lib, _state
    if not _state:
        with _lock:
            if not _state:
                _lib, _state = _build()
    return _lib is not None


def describe() -> str:
    """'on (path of the library)' or 'off (why)'."""
    available()
    return f"decoding kernels: {_state}"


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """x (B, K) @ weight (N, K).T + bias (N,) in fp32 on the CPU, B >= 1: one pass over the weights
    for up to 4 rows of x, 4 rows at a time beyond (each row alike: batch-invariant).

    weight is fp32 or bf16, or int8 with `scale` (N,) fp32: then the product is x @ (weight *
    scale[:, None]).T, summed in fp32. All tensors contiguous; callers check `available()` first."""
    B, K = x.shape
    N = weight.shape[0]
    kind = _WEIGHT_KINDS.get(weight.dtype)
    if not (B >= 1 and weight.shape[1] == K and x.is_contiguous() and weight.is_contiguous()
            and x.dtype == torch.float32 and kind is not None and (scale is not None) == (kind == "int8")
            and (bias is None or (bias.is_contiguous() and bias.dtype == torch.float32 and bias.shape == (N,)))
            and (scale is None or (scale.is_contiguous() and scale.dtype == torch.float32 and scale.shape == (N,)))):
        raise ValueError(f"skinny_linear takes contiguous fp32 x (B >= 1, K) and weight (N, K) in fp32, "
                         f"bf16, or int8 with fp32 scales (N,); got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(weight.shape)} {weight.dtype}, scale {None if scale is None else scale.dtype}")
    y = torch.empty(B, N, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    threads = torch.get_num_threads()
    if kind == "int8":
        _lib.skinny_linear_int8(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), b, y.data_ptr(), B, K, N, threads)
    else:
        fn = _lib.skinny_linear_bf16 if kind == "bf16" else _lib.skinny_linear
        fn(x.data_ptr(), weight.data_ptr(), b, y.data_ptr(), B, K, N, threads)
    return y


_WEIGHT_KINDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}


def decode_blocks(decoder: ctypes._CArgObject, x: Tensor, positions: list[int], scratch: Tensor) -> int:
    """Run csrc/decode.c's decode_blocks on x (B, C) in place, row b at positions[b]; 0, or -1 if
    it refused. decoder: a reference to ops/decoder.py's struct, which checks the rest."""
    B = x.shape[0]
    if not (x.dtype == torch.float32 and x.is_contiguous() and len(positions) == B and scratch.is_contiguous()):
        raise ValueError(f"decode_blocks takes contiguous fp32 x (B, C) and B positions; got {tuple(x.shape)} "
                         f"{x.dtype} and {len(positions)} positions")
    return _lib.decode_blocks(decoder, x.data_ptr(), B, (ctypes.c_long * B)(*positions), scratch.data_ptr(),
                              torch.get_num_threads())


def gelu_tanh(x: Tensor) -> Tensor:
    """F.gelu(x, approximate="tanh") for a contiguous fp32 CPU tensor (to rounding)."""
    _check_elementwise(x)
    y = torch.empty_like(x)
    _lib.gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def gelu_tanh_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * d gelu_tanh(x) / dx for contiguous fp32 CPU tensors of one shape."""
    _check_elementwise(x, grad)
    dx = torch.empty_like(x)
    _lib.gelu_tanh_backward(x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), torch.get_num_threads())
    return dx


def _check_elementwise(*ts: Tensor) -> None:
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.shape == ts[0].shape
               for t in ts):
        raise ValueError("gelu_tanh takes contiguous fp32 CPU tensors of one shape; got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in ts))


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hs)) v for one new token over S cached positions, fp32 on the CPU.

    q (B, nh, 1, hs); k, v (B, nh, S, hs) with rows of hs contiguous floats (a KV cache or a view
    of one). Returns (B, 1, nh * hs), the layout the output projection takes."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    if not (T == 1 and k.shape == v.shape == (B, nh, S, hs) and 1 <= S <= MAX_CACHED
            and q.stride(3) == 1 and k.stride()[2:] == (hs, 1) and v.stride() == k.stride()
            and q.dtype == k.dtype == v.dtype == torch.float32):
        raise ValueError(f"decode_attention takes fp32 q (B, nh, 1, hs) and k, v (B, nh, S, hs) with "
                         f"contiguous rows; got {tuple(q.shape)}, {tuple(k.shape)} {k.stride()}, {q.dtype}")
    y = torch.empty(B, 1, nh * hs, dtype=torch.float32)
    _lib.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, nh, S, hs,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), hs**-0.5, torch.get_num_threads())
    return y
