"""Building blocks shared by 2D and 3D networks (MONAI-style ``spatial_dims``).

Every factory takes ``spatial_dims`` (2 or 3) so one network definition serves both:
``conv(2, ...)`` is an ``nn.Conv2d``, ``conv(3, ...)`` an ``nn.Conv3d``. Kernel sizes,
strides and dilations may be an int (same on every axis) or one value per axis, which
is how the anisotropic 3D UNet asks for ``(1, 3, 3)`` in-plane and ``(3, 1, 1)``
through-plane convolutions. Tensors are ``(B, C, *spatial)`` with spatial ``(H, W)`` in
2D and ``(D, H, W)`` in 3D (depth first: torch's ``Conv3d`` order, the layout of the
data adapters' volumes and of the ``mtseg`` operators).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNormAct",
    "DoubleConv",
    "as_tuple",
    "check_spatial_dims",
    "conv",
    "conv_transpose",
    "interp_mode",
    "make_act",
    "make_norm",
    "max_pool",
    "resize_to",
    "same_padding",
]

NORMS = ("batch", "instance", "group", None)
ACTS = ("relu", "leaky_relu", None)


def check_spatial_dims(spatial_dims: int, allowed: Sequence[int] = (2, 3), who: str = "model") -> int:
    if spatial_dims not in allowed or isinstance(spatial_dims, bool):
        raise ValueError(f"{who}: spatial_dims must be one of {tuple(allowed)}, got {spatial_dims!r}")
    return int(spatial_dims)


def as_tuple(value: int | Sequence[int], spatial_dims: int, name: str = "value") -> tuple[int, ...]:
    """``3 -> (3, 3)`` in 2D; a sequence must have one entry per spatial axis."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (int(value),) * spatial_dims
    value = tuple(value)
    if len(value) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be an int or {spatial_dims} ints (one per spatial axis), got {value!r}")
    return tuple(int(v) for v in value)


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Padding that keeps the size for odd kernels at stride 1."""
    for k in kernel_size:
        if k % 2 != 1:
            raise ValueError(f"'same' padding needs odd kernel sizes, got {tuple(kernel_size)}")
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3, *, dilation=1, bias=True) -> nn.Module:
    """Stride-1 convolution with 'same' padding, ``nn.Conv2d`` or ``nn.Conv3d``."""
    ks = as_tuple(kernel_size, spatial_dims, "kernel_size")
    dil = as_tuple(dilation, spatial_dims, "dilation")
    cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return cls(in_channels, out_channels, ks, padding=same_padding(ks, dil), dilation=dil, bias=bias)


def conv_transpose(spatial_dims: int, in_channels: int, out_channels: int, scale=2) -> nn.Module:
    """Transposed convolution with kernel = stride = ``scale`` (exact ``scale``-times upsampling)."""
    sc = as_tuple(scale, spatial_dims, "scale")
    cls = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
    return cls(in_channels, out_channels, sc, stride=sc)


def max_pool(spatial_dims: int, kernel_size=2, *, ceil_mode: bool = False) -> nn.Module:
    ks = as_tuple(kernel_size, spatial_dims, "pool size")
    cls = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    return cls(ks, stride=ks, ceil_mode=ceil_mode)


def make_norm(norm: str | None, spatial_dims: int, channels: int) -> nn.Module:
    """``"batch"``, ``"instance"`` (affine), ``"group"`` (8 groups or fewer) or ``None``."""
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_act(act: str | None, negative_slope: float = 0.2) -> nn.Module:
    if act is None:
        return nn.Identity()
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation, size-preserving (stride 1, 'same' padding).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        dilation: int | Sequence[int] = 1,
        norm: str | None = "batch",
        act: str | None = "relu",
        negative_slope: float = 0.2,
        bias: bool | None = None,
    ):
        # A bias before batch/instance norm is cancelled by the norm's mean: by default
        # (bias=None) it is left out there; bias=True keeps it (U2Net's published layout).
        if bias is None:
            bias = norm in (None, "group")
        super().__init__(
            conv(spatial_dims, in_channels, out_channels, kernel_size, dilation=dilation, bias=bias),
            make_norm(norm, spatial_dims, out_channels),
            make_act(act, negative_slope),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` (the UNet block). ``kernel_sizes`` gives each conv's kernel.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence = (3, 3),
        *,
        norm: str | None = "batch",
        act: str | None = "relu",
        negative_slope: float = 0.2,
    ):
        layers = []
        channels = in_channels
        for ks in kernel_sizes:
            layers.append(
                ConvNormAct(spatial_dims, channels, out_channels, ks, norm=norm, act=act, negative_slope=negative_slope)
            )
            channels = out_channels
        super().__init__(*layers)


def interp_mode(spatial_dims: int) -> str:
    return "bilinear" if spatial_dims == 2 else "trilinear"


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/Tri)linear resize of ``(B, C, *S)`` to ``(B, C, *size)`` (``align_corners=False``)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=interp_mode(x.dim() - 2), align_corners=False)
