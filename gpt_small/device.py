"""Where and how a run executes: device, precision, CPU threads and the memory allocator.

Kept out of the model (STYLE.md item 2). `auto` picks CUDA, then Apple MPS, then the CPU; on CUDA
it picks bf16 autocast where the card has it, else fp16 with a GradScaler; on the CPU, fp32.
`bfloat16-if-faster` picks bf16 autocast wherever bf16 matmuls beat fp32, timed on the CPU (see
`cpu_bf16_matmul_speedup`). `configure_process` makes the process-wide settings (threads, the
allocator, TF32) once, at start-up.
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
    """The torch device for a device name; the one check every verb's --device goes through."""
    from .config import check_device

    check_device(name)
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


def pick_dtype(name: str, device: torch.device, bf16_faster: bool | None = None) -> torch.dtype:
    """The autocast dtype (float32 = no autocast) for a TrainConfig.dtype name. `bf16_faster`:
    the answer of bf16_matmul_is_faster(device) where the caller has it (one for all DDP ranks);
    None = ask it here."""
    if name == "bfloat16-if-faster":
        if bf16_faster is None:
            bf16_faster = bf16_matmul_is_faster(device)
        return torch.bfloat16 if bf16_faster else torch.float32
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


# A bf16 matmul beats fp32 on the CPU only where the hardware multiplies bf16 and torch's kernels
# use it: CPUs with the same AVX512-BF16 flag were found both much faster and much slower in bf16
# (benchmarks/train_throughput.py --bf16 shows it per machine). So the CPU's answer is measured,
# once per process and thread count, not read from /proc/cpuinfo.
_BF16_MIN_SPEEDUP = 1.25


@functools.cache
def cpu_bf16_matmul_speedup(threads: int) -> float:
    """fp32 time / bf16 time of a 512 x 512 x 512 CPU matmul at `threads` threads (median of 5
    each, after a warm-up). `threads` is part of the cache key only: pass
    torch.get_num_threads()."""
    import time

    def median_time(a: torch.Tensor) -> float:
        torch.mm(a, a)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - t)
        return sorted(times)[2]

    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # the global RNG untouched
    return median_time(a) / median_time(a.bfloat16())


def bf16_matmul_is_faster(device: torch.device) -> bool:
    """Whether bf16 matmuls run faster than fp32 on `device`: CUDA GPUs with bf16, and CPUs where
    a measured bf16 matmul is at least 1.25x faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return cpu_bf16_matmul_speedup(torch.get_num_threads()) >= _BF16_MIN_SPEEDUP


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


def configure_process(*, device: str = "auto", threads: int = 0) -> torch.device:
    """The process-wide settings a run wants, made once by the entry point before any Trainer.

    CPU: `threads` torch threads (0 = this process's share of the cores it may run on, torchrun's
    LOCAL_WORLD_SIZE processes sharing them) and glibc's allocator told to keep freed memory.
    CUDA: TF32 matmuls and convolutions. Returns the device `device` names. Idempotent.
    """
    dev = pick_device(device)
    if dev.type == "cpu":
        torchrun = "RANK" in os.environ  # as distributed.setup_distributed reads it
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) if torchrun else 1
        set_threads(threads, local_world_size)
        keep_freed_memory()
    elif dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation buffers back to the OS after every step.

    By default glibc serves allocations above 128 KiB-32 MiB with mmap and returns them with
    munmap on free, so a CPU training step re-faults every large activation page in the kernel
    (benchmarks/train_throughput.py's shape B shows the cost).
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
