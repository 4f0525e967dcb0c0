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
from torch.nn.modules.batchnorm import _BatchNorm


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


class _SumOverProcesses(torch.autograd.Function):
    """Sum of a tensor over the processes; the gradient of every process's copy is the sum
    of the processes' gradients (each process's loss depends on every copy)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the processes of ``group``."""
    return _SumOverProcesses.apply(x, group)


class SyncBatchNorm(_BatchNorm):
    """Batch norm synchronised over the processes on the CPU (gloo), where torch's
    ``nn.SyncBatchNorm`` refuses to run (and DDP refuses CPU modules holding one).

    In training mode with more than one process, the batch statistics are those of the
    global batch: per channel the sum and count, then the sum of squared deviations from
    the global mean, are summed over the processes with the
    differentiable :func:`all_reduce` (float64), so the output, the gradients
    (after DDP's averaging) and the running statistics equal those of one process that
    sees the whole global batch, up to rounding. In eval mode, or in one process, it is
    plain batch norm. :func:`convert_sync_batchnorm` uses torch's on CUDA, this one elsewhere.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm: the number of input channels must be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group or dist.group.WORLD
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.double()
        count = torch.full((1,), float(input.numel() // c), dtype=torch.float64, device=input.device)
        first = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        n = first[c]
        mean = first[:c] / n
        shape = (1, c) + (1,) * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=group) / n  # biased, as batch norm normalises
        out = centred / torch.sqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.double().view(shape) + self.bias.double().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None, device_type: str = "cpu") -> torch.nn.Module:
    """Every ``BatchNorm*d`` of ``module`` synchronised over the processes: torch's
    ``nn.SyncBatchNorm`` for CUDA, :class:`SyncBatchNorm` for other devices (same state dict)."""
    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if device_type != "cuda":
        for m in module.modules():
            if type(m) is torch.nn.SyncBatchNorm:
                m.__class__ = SyncBatchNorm  # same attributes; a _BatchNorm that DDP accepts on the CPU
    return module
