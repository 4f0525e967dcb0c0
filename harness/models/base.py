"""What every model shares: its identity, its input check, its heads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .blocks import check_spatial_dims
from .heads import HEAD_NAMES, Heads

__all__ = ["SegmentationModel"]


class SegmentationModel(nn.Module):
    """Base of every model: checks the input and keeps the resolved heads (:class:`Heads`).

    Subclasses set ``size_multiple`` (per spatial axis: every input size must be a
    multiple of it, the network's total stride) and ``min_size`` before the first
    forward, and call :meth:`check_input` at the top of ``forward``.
    """

    #: Heads this architecture can carry; subclasses narrow or widen it.
    SUPPORTED_HEADS: tuple[str, ...] = HEAD_NAMES
    #: Spatial dims this architecture supports.
    SPATIAL_DIMS: tuple[int, ...] = (2, 3)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 2,
        heads: Heads | Mapping | None = None,
        head_defaults: Mapping[str, Mapping] | None = None,
    ):
        super().__init__()
        who = type(self).__name__
        self.spatial_dims = check_spatial_dims(spatial_dims, self.SPATIAL_DIMS, who)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        supported = self.SUPPORTED_HEADS
        heads = Heads.parse(heads, who)
        if self.spatial_dims != 2:
            supported = tuple(h for h in supported if h != "hog")
            if heads.hog is not None:
                raise ValueError(f"{who}: the hog head regresses a 2D image descriptor; it needs spatial_dims=2")
        presence_hidden = (head_defaults or {}).get("presence", {}).get("hidden")
        self.head_config = heads.resolved(num_classes, who, supported=supported, presence_hidden=presence_hidden)
        self.size_multiple: tuple[int, ...] = (1,) * self.spatial_dims
        self.min_size: tuple[int, ...] = (1,) * self.spatial_dims

    @property
    def display_name(self) -> str:
        """The registry name when built by ``create_model`` (e.g. ``cmunet``), else the class."""
        name = getattr(self, "model_name", None)
        return f"{name} ({type(self).__name__})" if name else type(self).__name__

    def has_head(self, name: str) -> bool:
        return name in self.head_config

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for a wrong rank, channel count or spatial size."""
        who = self.display_name
        nd = self.spatial_dims
        axes = "(B, C, H, W)" if nd == 2 else "(B, C, D, H, W)"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: expected a tensor {axes}, got {type(x).__name__}")
        if x.dim() != nd + 2:
            raise ValueError(f"{who}: expected a {nd + 2}-d input {axes}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{who}: expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}")
        size = tuple(int(s) for s in x.shape[2:])
        if any(s % m for s, m in zip(size, self.size_multiple)) or any(s < m for s, m in zip(size, self.min_size)):
            need = tuple(max(math.ceil(s / m) * m, lo) for s, m, lo in zip(size, self.size_multiple, self.min_size))
            raise ValueError(
                f"{who}: spatial size {size} does not fit: every size must be a multiple of "
                f"{self.size_multiple} (the network's total stride) and at least {self.min_size}; "
                f"pad or resize to e.g. {need}"
            )

    def extra_repr(self) -> str:
        heads = ", ".join(self.head_config.names()) or "none"
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, num_classes={self.num_classes}, heads=[{heads}]"


def per_axis_product(sizes: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    out = [1] * spatial_dims
    for s in sizes:
        for i, v in enumerate(s):
            out[i] *= v
    return tuple(out)
