"""Loaders and the step-indexed data order of the trainer.

The order of training samples is a function of (seed, step) only: epoch ``e`` is the
permutation ``torch.randperm(n)`` drawn from a generator seeded with ``(seed, e)``, cut
into global batches of ``batch_size * world_size`` (the last incomplete batch dropped);
step ``s`` takes global batch ``s mod batches_per_epoch`` of epoch ``s div
batches_per_epoch``, and process ``r`` takes the ``r``-th slice of it. A run resumed at
step ``s`` therefore sees exactly the batches an uninterrupted run sees, and a
2-process run sees the same global batches as a 1-process run.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ..data import collate
from ..evaluation import shard_range


class StepBatchSampler(Sampler):
    """Infinite batch sampler indexed by training step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 start_step: int = 0):
        self.n, self.batch_size, self.world_size, self.rank = int(n), int(batch_size), int(world_size), int(rank)
        self.seed, self.start_step = int(seed), int(start_step)
        self.global_batch = self.batch_size * self.world_size
        self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {n} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower data.batch_size")

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def batch_at(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        perm = self.order(epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        return perm[start:start + self.batch_size].tolist()

    def __iter__(self):
        step = self.start_step
        epoch, k = divmod(step, self.per_epoch)
        perm = self.order(epoch)
        while True:
            if k == self.per_epoch:
                epoch, k = epoch + 1, 0
                perm = self.order(epoch)
            start = k * self.global_batch + self.rank * self.batch_size
            yield perm[start:start + self.batch_size].tolist()
            k += 1

    def __len__(self):  # infinite; DataLoader only needs this for len(loader)
        return 2**62


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what taskset, cgroups cpusets and
    torch's DataLoader worker check count), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_workers(max_workers: int = 4) -> int:
    """Loader workers for ``data.num_workers: auto``: the CPUs available to each process of this
    machine (``LOCAL_WORLD_SIZE`` under torchrun) less one for the process itself, at most
    ``max_workers``: 1 on a 2-core machine, 0 on one core (loading in the main process)."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(0, min(max_workers, available_cpus() // local - 1))


def num_workers(cfg: dict) -> int:
    """``data.num_workers``: a number, or ``auto`` (:func:`default_num_workers`)."""
    n = cfg["data"].get("num_workers")
    return default_num_workers() if n == "auto" else int(n or 0)


def train_loader(dataset, cfg: dict, *, world_size: int = 1, rank: int = 0, start_step: int = 0) -> DataLoader:
    d = cfg["data"]
    sampler = StepBatchSampler(len(dataset), d["batch_size"], world_size=world_size, rank=rank, seed=cfg["seed"],
                               start_step=start_step)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers(cfg),
                      persistent_workers=False, pin_memory=False)


def eval_loader(dataset, cfg: dict, *, rank: int = 0, world: int = 1, limit: int | None = None) -> DataLoader:
    """The evaluation loader of process ``rank`` of ``world``: its contiguous shard
    (:func:`~mtseg_harness.evaluation.shard_range`) of the first ``limit`` samples (all
    by default), in order."""
    d = cfg["data"]
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if world > 1 or n < len(dataset):
        dataset = Subset(dataset, list(shard_range(n, rank, world)))
    return DataLoader(dataset, batch_size=int(d.get("eval_batch_size") or d["batch_size"]), shuffle=False,
                      collate_fn=collate, num_workers=num_workers(cfg))


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def slice_params(params: dict, rank: int, batch_size: int) -> dict:
    """This process's part of augmentation parameters drawn for the whole global batch."""
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = {a: t[lo:hi] for a, t in v.items()}
        elif isinstance(v, torch.Tensor) and v.dim() >= 1:
            out[k] = v[lo:hi]
        else:
            out[k] = v
    return out
