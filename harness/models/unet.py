"""UNet family: Ronneberger's UNet, the anisotropic 3D UNet (BraTS crops), CMU-Net's UNet.

One generic encoder-decoder (:class:`UNet`) covers all three; they differ only in
widths, convolution kernels, pooling, normalisation and activation:

* ``unet`` / ``unet_bilinear``: Ronneberger et al. 2015 with 'same' padding and batch
  norm; widths 64..1024 (depth 4). Upsampling by 2x2 transposed convolution, or
  (bi/tri)linear resize followed by a 1x1 convolution that halves the channels. Both
  variants keep the same bottleneck width, so the HOG head at the bottleneck fits both.
* ``unet3d_aniso``: 3D UNet for BraTS-style crops ``(B, 4, 19, 144, 144)`` (D, H, W): each
  block is an in-plane ``1x3x3`` then a through-plane ``3x1x1`` convolution; pooling is
  in-plane ``1x2x2`` (through-plane ``2x2x2`` only at levels where ``through_plane_pool`` says,
  or where ``input_depth`` leaves enough slices).
* ``cmunet``: CMU-Net's UNet (Moseley et al.): five encoder blocks 16 -> 256, two
  convs per block with instance norm and LeakyReLU(0.2), a mirrored decoder, 1x1
  output; its classification head sits on the encoder (GAP + one linear): the
  ``presence`` head.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import SegmentationModel, per_axis_product
from .blocks import DoubleConv, as_tuple, conv, conv_transpose, max_pool, resize_to
from .heads import Heads, ModelOutput, make_class_head, make_hog_head

__all__ = ["UNet", "anisotropic_pool_schedule", "anisotropic_unet3d", "cmunet", "unet"]


class _Up(nn.Module):
    """Upsample ``(B, C_in, *s)`` to the skip's size with ``C_out`` channels."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, scale, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.proj = conv_transpose(spatial_dims, in_channels, out_channels, scale)
        else:  # linear resize, then a 1x1 conv to the skip's width
            self.proj = conv(spatial_dims, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        return self.proj(resize_to(x, size))


class UNet(SegmentationModel):
    """Generic UNet, 2D or 3D, with optional heads.

    Args:
        in_channels: input channels C.
        num_classes: segmentation classes K (logits, no softmax).
        spatial_dims: 2 or 3.
        channels: widths per level, shallow to deep; ``len(channels) - 1`` poolings.
        upsampling: ``"transpose"`` or ``"bilinear"`` (trilinear in 3D).
        kernel_sizes: kernel of each conv in a block, e.g. ``(3, 3)`` or
            ``((1, 3, 3), (3, 1, 1))``.
        pool_sizes: pooling per level transition (``len(channels) - 1`` entries, each
            an int or one int per axis); default 2 everywhere.
        norm, act, negative_slope: see :func:`~mtseg_harness.models.blocks.make_norm`.
        heads: :class:`~mtseg_harness.models.heads.Heads` or its mapping form
            (``{"hog": True, ...}``); hog, presence and scene
            read the bottleneck, approx duplicates the last ``blocks`` decoder stages.
        presence_hidden: default hidden width of the presence head (``None``: one linear).

    Input ``(B, C, *S)``, every size in ``S`` a multiple of the product of the pool sizes
    on that axis (16 for the default depth 4). Output :class:`ModelOutput` with
    ``seg (B, K, *S)``, ``side ()``, ``hog`` one ``(B, dim)`` or empty, ``presence (B, P)``,
    ``scene (B, num_scenes)``, ``approx (B, K_approx, *S)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        upsampling: str = "transpose",
        kernel_sizes: Sequence = (3, 3),
        pool_sizes: Sequence | None = None,
        norm: str | None = "batch",
        act: str | None = "relu",
        negative_slope: float = 0.2,
        heads: Heads | Mapping | None = None,
        presence_hidden: int | None = None,
    ):
        super().__init__(
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            heads=heads,
            head_defaults={"presence": {"hidden": presence_hidden}},
        )
        nd = self.spatial_dims
        channels = tuple(channels)
        if len(channels) < 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"UNet: channels must be two or more positive ints, got {channels!r}")
        if upsampling not in ("transpose", "bilinear"):
            raise ValueError(f"UNet: upsampling must be 'transpose' or 'bilinear', got {upsampling!r}")
        n_down = len(channels) - 1
        if pool_sizes is None:
            pool_sizes = [2] * n_down
        if len(pool_sizes) != n_down:
            raise ValueError(f"UNet: pool_sizes needs {n_down} entries (one per level transition), got {len(pool_sizes)}")
        pools = [as_tuple(p, nd, "pool size") for p in pool_sizes]
        self.channels = channels
        self.upsampling = upsampling
        self.size_multiple = per_axis_product(pools, nd)
        self.min_size = self.size_multiple

        block = dict(kernel_sizes=kernel_sizes, norm=norm, act=act, negative_slope=negative_slope)
        self.encoder = nn.ModuleList([DoubleConv(nd, in_channels, channels[0], **block)])
        self.pools = nn.ModuleList()
        for i in range(1, len(channels)):
            self.pools.append(max_pool(nd, pools[i - 1]))
            self.encoder.append(DoubleConv(nd, channels[i - 1], channels[i], **block))

        def decoder_stage(i: int) -> nn.ModuleDict:  # from level i to level i - 1
            return nn.ModuleDict(
                {
                    "up": _Up(nd, channels[i], channels[i - 1], pools[i - 1], upsampling),
                    "block": DoubleConv(nd, 2 * channels[i - 1], channels[i - 1], **block),
                }
            )

        # decoder[0] is the deepest stage, decoder[-1] returns to full resolution.
        self.decoder = nn.ModuleList([decoder_stage(i) for i in range(len(channels) - 1, 0, -1)])
        self.out = conv(nd, channels[0], num_classes, 1)

        cfg = self.head_config
        bottleneck = channels[-1]
        self.hog_head = make_hog_head(cfg, bottleneck)
        self.presence_head = make_class_head(cfg, "presence", bottleneck)
        self.scene_head = make_class_head(cfg, "scene", bottleneck)
        self.approx_decoder = None
        self.approx_out = None
        self.approx_blocks = 0
        if "approx" in cfg:
            nb = cfg.approx.blocks
            if nb > n_down:
                raise ValueError(f"UNet: approx blocks must be <= {n_down} (the decoder stages), got {nb}")
            self.approx_blocks = nb
            self.approx_decoder = nn.ModuleList(copy.deepcopy(self.decoder[len(self.decoder) - nb :]))
            self.approx_out = conv(nd, channels[0], cfg.approx.num_classes, 1)

    @staticmethod
    def _run_stages(stages, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for stage, skip in zip(stages, skips):
            x = stage["up"](x, skip.shape[2:])
            x = stage["block"](torch.cat([skip, x], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.check_input(x)
        skips = []
        h = self.encoder[0](x)
        for pool, enc in zip(self.pools, self.encoder[1:]):
            skips.append(h)
            h = enc(pool(h))
        bottleneck = h
        skips = skips[::-1]  # deepest first, like the decoder
        n_shared = len(self.decoder) - self.approx_blocks
        h = self._run_stages(self.decoder[:n_shared], bottleneck, skips[:n_shared])
        shared = h
        h = self._run_stages(self.decoder[n_shared:], h, skips[n_shared:])
        seg = self.out(h)
        approx = None
        if self.approx_decoder is not None:
            approx = self.approx_out(self._run_stages(self.approx_decoder, shared, skips[n_shared:]))
        return ModelOutput(
            seg=seg,
            side=(),
            hog=(self.hog_head(bottleneck),) if self.hog_head is not None else (),
            presence=self.presence_head(bottleneck) if self.presence_head is not None else None,
            scene=self.scene_head(bottleneck) if self.scene_head is not None else None,
            approx=approx,
        )


def unet(in_channels: int, num_classes: int, *, spatial_dims: int = 2, depth: int = 4, base_channels: int = 64,
         channels: Sequence[int] | None = None, upsampling: str = "transpose", **kwargs) -> UNet:
    """Ronneberger's UNet: widths ``base_channels * 2**level`` for ``depth`` poolings."""
    if channels is None:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"unet: depth must be an int >= 1, got {depth!r}")
        channels = tuple(base_channels * 2**i for i in range(depth + 1))
    return UNet(in_channels, num_classes, spatial_dims=spatial_dims, channels=channels, upsampling=upsampling, **kwargs)


def anisotropic_pool_schedule(levels: int, input_depth: int | None, min_depth: int = 4) -> tuple[bool, ...]:
    """Which levels also pool through-plane: while the depth stays even and >= 2 * min_depth.

    BraTS crops of 19 slices never pool through-plane; 32 slices pool at three levels.
    """
    out = []
    d = input_depth
    for _ in range(levels):
        ok = d is not None and d % 2 == 0 and d // 2 >= min_depth
        out.append(ok)
        if ok:
            d //= 2
    return tuple(out)


def anisotropic_unet3d(in_channels: int = 4, num_classes: int = 4, *, spatial_dims: int = 3,
                       channels: Sequence[int] = (32, 64, 128, 256, 512), upsampling: str = "transpose",
                       through_plane_pool: Sequence[bool] | None = None, input_depth: int | None = None,
                       **kwargs) -> UNet:
    """Anisotropic 3D UNet for ``(B, 4, 19, 144, 144)`` BraTS crops (depth first, as torch's
    ``Conv3d`` and the data adapters lay out volumes: ``(D, H, W)``).

    Blocks: in-plane ``(1, 3, 3)`` conv then through-plane ``(3, 1, 1)`` conv, each with
    batch norm and ReLU. Pooling ``(1, 2, 2)``; a level pools ``(2, 2, 2)`` where
    ``through_plane_pool[level]`` is true (default: from ``input_depth`` by
    :func:`anisotropic_pool_schedule`; none when ``input_depth`` is not given).
    """
    if spatial_dims != 3:
        raise ValueError(f"anisotropic_unet3d is 3D only: spatial_dims must be 3, got {spatial_dims!r}")
    levels = len(channels) - 1
    if through_plane_pool is None:
        through_plane_pool = anisotropic_pool_schedule(levels, input_depth)
    if len(through_plane_pool) != levels:
        raise ValueError(f"anisotropic_unet3d: through_plane_pool needs {levels} entries, got {len(through_plane_pool)}")
    pools = [(2 if z else 1, 2, 2) for z in through_plane_pool]
    return UNet(in_channels, num_classes, spatial_dims=3, channels=channels, upsampling=upsampling,
                kernel_sizes=((1, 3, 3), (3, 1, 1)), pool_sizes=pools, **kwargs)


def cmunet(in_channels: int, num_classes: int, *, spatial_dims: int = 2,
           channels: Sequence[int] = (16, 32, 64, 128, 256), **kwargs) -> UNet:
    """CMU-Net's UNet: 16 -> 256, instance norm + LeakyReLU(0.2), transposed-conv decoder.

    Its classification head (GAP + one linear on the encoder's last block) is the
    ``presence`` head: ``create_model("cmunet", 1, 3, heads={"presence": True})``.
    """
    kwargs.setdefault("norm", "instance")
    kwargs.setdefault("act", "leaky_relu")
    kwargs.setdefault("negative_slope", 0.2)
    kwargs.setdefault("upsampling", "transpose")
    return UNet(in_channels, num_classes, spatial_dims=spatial_dims, channels=channels, **kwargs)
