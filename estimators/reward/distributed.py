"""Data-parallel training across processes: ``torch.distributed`` as ``torchrun`` sets it up (NCCL on GPUs, gloo on
CPU). A process that was not started by ``torchrun`` is a world of one, and every helper here is then a no-op.

How the trainer shares work (``trainer``): every rank reads the same seeded order of the (memory-mapped) cache
and takes its own slice of each global batch, so a run's batches, and hence its result, do not depend on the
number of processes (up to float summation order). Rank 0 alone writes checkpoints, models and metrics.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = dt.timedelta(hours=2)
"""How long a rank waits for the others at a collective: rank 0 may be writing the token cache meanwhile."""


def launched() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> None:
    """Join the process group torchrun describes (once): NCCL for CUDA, gloo for CPU."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a world of one)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
