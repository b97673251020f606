"""Where and how a run executes: device, precision, CPU threads and the memory allocator.

Kept out of the model (STYLE.md item 2). `auto` picks CUDA, then Apple MPS, then the CPU; on CUDA
it picks bf16 autocast where the card has it, else fp16 with a GradScaler; on the CPU, fp32 (on
the CPUs we measured, bf16 matmuls run at half the fp32 speed: see shared/anchors.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys

import torch

from .errors import GPTSmallError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GPTSmallError(f"device {name!r} asked for, but this torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GPTSmallError("device 'mps' asked for, but Apple MPS is not available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty
    where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ()
    return tuple(line.partition(":")[2].split())


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: CUDA GPUs with bf16, and x86 CPUs
    with AVX512-BF16 or AMX (elsewhere torch emulates bf16 on the CPU, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and ("avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags())


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int, local_world_size: int = 1) -> int:
    """Use every core this process may run on, shared among the processes of this machine."""
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local_world_size)
    torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation buffers back to the OS after every step.

    By default glibc serves allocations above 128 KiB-32 MiB with mmap and returns them with
    munmap on free, so a CPU training step re-faults every large activation page in the kernel:
    nanoGPT's shakespeare_char shape spends a quarter of its time there (shared/anchors.md).
    With mmap disabled and trimming raised, freed blocks stay in the heap and are reused.
    Returns whether the setting took (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_TOP_PAD = -1, -4, -2
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    ok &= libc.mallopt(M_TOP_PAD, 64 * 2**20) == 1
    return bool(ok)
