"""U^2-Net (Qin et al., Pattern Recognition 2020): nested UNet of RSU blocks.

Full configuration 44,009,869 parameters (the published 44.0M), lite (``U2NETP``)
1,131,181 (1.13M), for 3 input channels and 1 output. Six encoder stages (RSU-7, RSU-6,
RSU-5, RSU-4, RSU-4F, RSU-4F), five decoder stages, a 3x3 side-output conv on each of six
features (decoder stages 1d-5d and encoder stage 6), all upsampled to the input size and
fused by a 1x1 conv.
Pooling rounds up (``ceil_mode``) and every upsampling resizes to the skip's size, so
any input size works. Outputs are logits (the published code applies a sigmoid).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import ConvNormAct as _ConvNormAct
from .blocks import conv, max_pool, resize_to
from .heads import ModelOutput, make_class_head, make_hog_head

__all__ = ["RSU", "RSU4F", "U2Net", "U2NET_CONFIGS"]

# The published REBNCONV keeps the conv bias before batch norm; so do we, so the
# parameter counts match the paper (44,009,869 full / 1,131,181 lite for 3 -> 1).
ConvNormAct = partial(_ConvNormAct, bias=True)


class RSU(nn.Module):
    """Residual U-block RSU-L (L = ``height``): an inner UNet of L-2 poolings, plus the input.

    Shapes: ``(B, in_ch, *S) -> (B, out_ch, *S)``, any ``S``.
    """

    def __init__(self, spatial_dims: int, height: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        nd = spatial_dims
        self.conv_in = ConvNormAct(nd, in_ch, out_ch)
        self.enc = nn.ModuleList([ConvNormAct(nd, out_ch, mid_ch)])
        self.enc.extend(ConvNormAct(nd, mid_ch, mid_ch) for _ in range(height - 2))
        self.pool = max_pool(nd, 2, ceil_mode=True)
        self.bottom = ConvNormAct(nd, mid_ch, mid_ch, dilation=2)
        self.dec = nn.ModuleList(ConvNormAct(nd, 2 * mid_ch, mid_ch) for _ in range(height - 2))
        self.dec.append(ConvNormAct(nd, 2 * mid_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hx_in = self.conv_in(x)
        feats = []
        h = hx_in
        for i, enc in enumerate(self.enc):
            if i > 0:
                h = self.pool(h)
            h = enc(h)
            feats.append(h)
        h = self.bottom(h)
        for dec, skip in zip(self.dec, reversed(feats)):
            h = dec(torch.cat([resize_to(h, skip.shape[2:]), skip], dim=1))
        return h + hx_in


class RSU4F(nn.Module):
    """RSU-4F: RSU-4 with dilations 1, 2, 4, 8 instead of pooling (no resizing).

    Shapes: ``(B, in_ch, *S) -> (B, out_ch, *S)``.
    """

    def __init__(self, spatial_dims: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        nd = spatial_dims
        self.conv_in = ConvNormAct(nd, in_ch, out_ch)
        self.enc = nn.ModuleList(
            [ConvNormAct(nd, out_ch, mid_ch, dilation=1), ConvNormAct(nd, mid_ch, mid_ch, dilation=2),
             ConvNormAct(nd, mid_ch, mid_ch, dilation=4)]
        )
        self.bottom = ConvNormAct(nd, mid_ch, mid_ch, dilation=8)
        self.dec = nn.ModuleList(
            [ConvNormAct(nd, 2 * mid_ch, mid_ch, dilation=4), ConvNormAct(nd, 2 * mid_ch, mid_ch, dilation=2),
             ConvNormAct(nd, 2 * mid_ch, out_ch, dilation=1)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hx_in = self.conv_in(x)
        feats = []
        h = hx_in
        for enc in self.enc:
            h = enc(h)
            feats.append(h)
        h = self.bottom(h)
        for dec, skip in zip(self.dec, reversed(feats)):
            h = dec(torch.cat([h, skip], dim=1))
        return h + hx_in


#: (height, mid_ch, out_ch) of encoder stages 1-6 and decoder stages 5..1 (height 0 = RSU-4F),
#: as in the published ``U2NET`` / ``U2NETP``.
U2NET_CONFIGS = {
    "full": {
        "encoder": [(7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), (0, 256, 512), (0, 256, 512)],
        "decoder": [(0, 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64)],
    },
    "lite": {
        "encoder": [(7, 16, 64), (6, 16, 64), (5, 16, 64), (4, 16, 64), (0, 16, 64), (0, 16, 64)],
        "decoder": [(0, 16, 64), (4, 16, 64), (5, 16, 64), (6, 16, 64), (7, 16, 64)],
    },
}


def _rsu(nd: int, height: int, in_ch: int, mid: int, out: int) -> nn.Module:
    return RSU4F(nd, in_ch, mid, out) if height == 0 else RSU(nd, height, in_ch, mid, out)


class U2Net(SegmentationModel):
    """U^2-Net, full or lite, 2D or 3D, with optional heads.

    Args:
        in_channels: input channels C.
        num_classes: K (logits; use K=1 with a sigmoid for the published binary setting).
        config: ``"full"`` (~44.0M parameters) or ``"lite"`` (~1.1M).
        spatial_dims: 2 or 3.
        heads: ``hog``: six HOG regression units, one on each decoder stage's feature
            (the six that feed the side outputs, stage 1 first); ``presence`` and
            ``scene``: on the deepest encoder stage; ``approx``: its own six side convs
            and fuse conv on the shared decoder features (``blocks`` must be 1).

    Input ``(B, C, *S)``, any size. Output :class:`ModelOutput`: ``seg (B, K, *S)`` (the
    fused output), ``side`` six ``(B, K, *S)`` (stage 1 first), ``hog`` six ``(B, dim)``
    or empty, ``presence (B, P)``, ``scene (B, num_scenes)``, ``approx (B, K_approx, *S)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        config: str = "full",
        spatial_dims: int = 2,
        heads: Mapping | None = None,
    ):
        super().__init__(in_channels, num_classes, spatial_dims=spatial_dims, heads=heads)
        if config not in U2NET_CONFIGS:
            raise ValueError(f"U2Net: config must be one of {tuple(U2NET_CONFIGS)}, got {config!r}")
        nd = self.spatial_dims
        self.config = config
        cfg = U2NET_CONFIGS[config]
        self.encoder = nn.ModuleList()
        ch = in_channels
        enc_out = []
        for height, mid, out in cfg["encoder"]:
            self.encoder.append(_rsu(nd, height, ch, mid, out))
            ch = out
            enc_out.append(out)
        self.pool = max_pool(nd, 2, ceil_mode=True)
        # decoder[0] is stage 5d (fed by stage 6 and stage 5), decoder[4] is stage 1d.
        self.decoder = nn.ModuleList()
        dec_out = []
        for j, (height, mid, out) in enumerate(cfg["decoder"]):
            skip = enc_out[4 - j]
            self.decoder.append(_rsu(nd, height, ch + skip, mid, out))
            ch = out
            dec_out.append(out)
        # side features, stage 1 first: hx1d, hx2d, hx3d, hx4d, hx5d, hx6
        self.side_channels = tuple(dec_out[::-1]) + (enc_out[-1],)
        self.side = nn.ModuleList(conv(nd, c, num_classes, 3) for c in self.side_channels)
        self.fuse = conv(nd, 6 * num_classes, num_classes, 1)

        hc = self.head_config
        self.hog_heads = nn.ModuleList(make_hog_head(hc, c) for c in self.side_channels) if "hog" in hc else None
        self.presence_head = make_class_head(hc, "presence", enc_out[-1])
        self.scene_head = make_class_head(hc, "scene", enc_out[-1])
        self.approx_side = None
        self.approx_fuse = None
        if "approx" in hc:
            if hc.approx.blocks != 1:
                raise ValueError("U2Net: the approx output has its own side convs and fuse conv; blocks must be 1")
            k = hc.approx.num_classes
            self.approx_side = nn.ModuleList(conv(nd, c, k, 3) for c in self.side_channels)
            self.approx_fuse = conv(nd, 6 * k, k, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.check_input(x)
        size = x.shape[2:]
        enc = []
        h = x
        for i, stage in enumerate(self.encoder):
            if i > 0:
                h = self.pool(h)
            h = stage(h)
            enc.append(h)
        dec = []
        for j, stage in enumerate(self.decoder):
            skip = enc[4 - j]
            h = stage(torch.cat([resize_to(h, skip.shape[2:]), skip], dim=1))
            dec.append(h)
        feats = dec[::-1] + [enc[-1]]  # stage 1 first
        side = tuple(resize_to(s(f), size) for s, f in zip(self.side, feats))
        seg = self.fuse(torch.cat(side, dim=1))
        approx = None
        if self.approx_side is not None:
            a = [resize_to(s(f), size) for s, f in zip(self.approx_side, feats)]
            approx = self.approx_fuse(torch.cat(a, dim=1))
        return ModelOutput(
            seg=seg,
            side=side,
            hog=tuple(head(f) for head, f in zip(self.hog_heads, feats)) if self.hog_heads is not None else (),
            presence=self.presence_head(enc[-1]) if self.presence_head is not None else None,
            scene=self.scene_head(enc[-1]) if self.scene_head is not None else None,
            approx=approx,
        )
