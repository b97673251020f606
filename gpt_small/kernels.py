"""A hand-written fp32 kernel for decoding on the CPU: `skinny_linear`, y = x @ W.T + b for 1-8 rows.

Decoding multiplies one row of activations per sample by every weight matrix, so a token costs a
read of all the weights; at the 6x384 shape (42 MB, more than the L3 cache) that read is the step.
torch's fp32 kernels (MKL, oneDNN) stream such weights at about half the memory bandwidth on our
2-core machine; the 40 lines of C in csrc/skinny_linear.c reach it (README, "Generation speed";
benchmarks/weight_streaming.py times both).

The C file is compiled at first use with the system's C compiler (`cc -O3 -march=native
-fopenmp`, about a second) into `kernels/` of the cache (`$GPT_SMALL_CACHE`, default
`~/.cache/gpt-small`), keyed by the source, compiler, flags and CPU, and loaded with ctypes: no
build step at install, no torch headers. Without a compiler, or with `GPT_SMALL_KERNELS=0`,
`available()` is False and the model falls back to oneDNN/F.linear (same results to rounding);
`describe()` says which and why.
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

from .corpus import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.c"
MAX_ROWS = 8  # rows of x the kernel takes (batch size when decoding)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_fn: ctypes._CFuncPtr | None = None
_state = ""  # "" = not tried yet; else a description of what was loaded or why not


def _cpu_id() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> tuple[ctypes._CFuncPtr | None, str]:
    if os.environ.get("GPT_SMALL_KERNELS", "1") == "0":
        return None, "off (GPT_SMALL_KERNELS=0)"
    cc = _compiler()
    if cc is None:
        return None, "off (no C compiler found; set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *FLAGS, _cpu_id()]).encode())
        lib_path = cache_dir() / "kernels" / f"skinny_linear-{key.hexdigest()[:16]}.so"
        if not lib_path.exists():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode != 0:
                    first = (done.stderr.strip().splitlines() or ["no message"])[0]
                    return None, f"off ({Path(cc).name} failed: {first})"
                os.replace(tmp, lib_path)  # atomic: concurrent builders agree on one file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        fn = ctypes.CDLL(str(lib_path)).skinny_linear
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"off ({type(e).__name__}: {e})"
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn, f"on ({lib_path})"


def available() -> bool:
    """Whether skinny_linear can run here (builds the kernel on the first call)."""
    global _fn, _state
    if not _state:
        with _lock:
            if not _state:
                _fn, _state = _build()
    return _fn is not None


def describe() -> str:
    """'on (path of the library)' or 'off (why)'."""
    available()
    return f"skinny_linear: {_state}"


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (B, K) @ weight (N, K).T + bias (N,) in fp32 on the CPU, for 1 <= B <= MAX_ROWS.

    All tensors must be contiguous; callers check `available()` first."""
    B, K = x.shape
    N = weight.shape[0]
    if not (1 <= B <= MAX_ROWS and weight.shape[1] == K and x.is_contiguous() and weight.is_contiguous()
            and x.dtype == weight.dtype == torch.float32 and (bias is None or bias.is_contiguous())):
        raise ValueError(f"skinny_linear takes contiguous fp32 x (1..{MAX_ROWS}, K) and weight (N, K); got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    y = torch.empty(B, N, dtype=torch.float32)
    _fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        B, K, N, torch.get_num_threads())
    return y
