"""Multi-process set-up for `torchrun`, rank helpers and the one logging helper, `print0`.

`torchrun --nproc_per_node N -m gpt_small train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; we
join the process group with gloo on the CPU and NCCL on CUDA. Without those variables everything
here is a no-op for a single process, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if there is one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def teardown_distributed(ok: bool = True) -> None:
    """Leave the process group. After a run that ended normally the ranks first wait for each
    other (rank 0 may still be writing the checkpoint and plot), so none tears down gloo's
    connections under a peer; after an error there is no barrier, which a dead peer would hang."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a Python float over ranks (evaluation losses)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any: a MAX all-reduce (a stop request must stop all ranks together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
