"""Multi-process training with PyTorch's own stack: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node=N -m mtseg_harness.cli train --config ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init_distributed`
joins the group (gloo on CPU, NCCL on CUDA). ``data.batch_size`` is per process: the
global batch is ``batch_size * world_size``, and every process sees its own slice of the
same global batch a 1-process run with ``batch_size * world_size`` would see.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device_type: str = "cpu") -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world, local_rank)."""
    rank, world, local = env_world()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return rank, world, local


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: float, device) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
