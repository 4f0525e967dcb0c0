"""TDSNet-style network (Ren et al., "Task decomposition and synchronization for semantic
biomedical image segmentation", IEEE TIP 2020), PSPNet/DeepLab-like.

* Encoder: VGG16 (13 3x3 convs, widths 64-128-256-512-512, no batch norm), laid out
  exactly like torchvision's ``vgg16().features`` so its state dict loads by key
  (``encoder_weights=path``; nothing is downloaded, random init by default). The 4th
  and 5th max-pools are replaced by identities and block 5 is dilated by 2
  (DeepLab-style), so the encoder's output stride is 8.
* Context-ensemble block: five stacked dilated 3x3 convs (dilations 1, 2, 4, 8, 16);
  the input and the five intermediate outputs have effective receptive fields
  1, 3, 7, 15, 31, 63 and are summed.
* Three task-pair branches (3x3 conv each): ``seg_cls``, ``seg_scene``, ``cls_scene``.
  Each task reads the two branches it belongs to: segmentation ``seg_cls + seg_scene``,
  class ``seg_cls + cls_scene``, scene ``cls_scene + seg_scene`` (concatenated).
* Segmentation decoder (DeepLabv3+-like): the branch features upsampled to stride 4,
  concatenated with a 48-channel projection of VGG block 3, two 3x3 convs, a 1x1
  classifier, bilinear upsampling to the input size.
* Class (presence) head and scene head: global average pooling + two linear layers
  with 256 hidden units.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import ConvNormAct, conv, resize_to
from .heads import ModelOutput, make_class_head, make_hog_head

__all__ = ["ContextEnsemble", "TDSNet", "VGG16_LAYOUT"]

#: torchvision's VGG16 "D" layout: widths, "M" = max-pool.
VGG16_LAYOUT = (0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4, "M")


class ContextEnsemble(nn.Module):
    """Stacked dilated 3x3 convs whose outputs are summed with the input.

    ``y0 = x``, ``y_k = act(norm(conv_{d_k}(y_{k-1})))`` with dilations ``d = 1, 2, 4, 8, 16``;
    ``y_k`` sees ``1 + 2 * (d_1 + ... + d_k)`` pixels per axis: 1, 3, 7, 15, 31, 63.
    Output ``x + y1 + ... + y5``. Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self, channels: int, dilations: Sequence[int] = (1, 2, 4, 8, 16), norm: str | None = "batch", spatial_dims: int = 2
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNormAct(spatial_dims, channels, channels, 3, dilation=d, norm=norm) for d in dilations
        )

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[y0, y1, ..., y5]``, each ``(B, C, H, W)``."""
        out = [x]
        for c in self.convs:
            out.append(c(out[-1]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x
        h = x
        for c in self.convs:
            h = c(h)
            total = total + h
        return total


class TDSNet(SegmentationModel):
    """TDSNet-style segmentation network with class-presence and scene heads (2D).

    Args:
        in_channels: input channels C (3 for VGG weights).
        num_classes: segmentation classes K.
        channels: VGG widths of blocks 1-5 (default 64, 128, 256, 512, 512; narrower for
            tests; loading weights needs the default).
        branch_channels: width of each task-pair branch (256).
        decoder_channels: width of the decoder convs (256).
        norm: norm of the context-ensemble, branch and decoder convs (VGG has none).
        encoder_weights: optional path to a VGG16 state dict (torchvision keys
            ``features.N.weight``/``bias``, or the same without the prefix).
        heads: ``presence`` (GAP + FC 256 + FC K by default), ``scene`` (needs
            ``num_scenes``), ``hog`` (on the context-ensemble output), ``approx`` (its own
            copy of the decoder's last ``blocks`` convs, 1 or 2, and classifier).

    Input ``(B, C, H, W)``, any size >= 8. Output :class:`ModelOutput`:
    ``seg (B, K, H, W)``, ``side ()``, ``hog`` one ``(B, dim)`` or empty,
    ``presence (B, P)``, ``scene (B, num_scenes)``, ``approx (B, K_approx, H, W)``.
    """

    SPATIAL_DIMS = (2,)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        branch_channels: int = 256,
        decoder_channels: int = 256,
        norm: str | None = "batch",
        encoder_weights: str | os.PathLike | None = None,
        heads: Mapping | None = None,
    ):
        super().__init__(
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            heads=heads,
            head_defaults={"presence": {"hidden": 256}},
        )
        channels = tuple(channels)
        if len(channels) != 5:
            raise ValueError(f"TDSNet: channels must be the 5 VGG block widths, got {channels!r}")
        self.min_size = (8, 8)
        layers: list[nn.Module] = []
        ch = in_channels
        n_pool = 0
        for item in VGG16_LAYOUT:
            if item == "M":
                n_pool += 1
                # pools 4 and 5 become identities: output stride 8 (keys stay torchvision's)
                layers.append(nn.MaxPool2d(2, ceil_mode=True) if n_pool <= 3 else nn.Identity())
            else:
                dilation = 2 if item == 4 else 1
                layers += [nn.Conv2d(ch, channels[item], 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                ch = channels[item]
        self.features = nn.Sequential(*layers)
        self.low_level_index = 16  # features[:16] ends with block 3 (stride 4), before pool 3
        if encoder_weights is not None:
            self.load_encoder_weights(encoder_weights)

        top = channels[4]
        self.context = ContextEnsemble(top, norm=norm)
        b = branch_channels
        hc = self.head_config
        self.branch_seg_cls = ConvNormAct(2, top, b, 3, norm=norm)
        self.branch_seg_scene = ConvNormAct(2, top, b, 3, norm=norm)
        # the class-scene branch only feeds the class and scene heads
        self.branch_cls_scene = ConvNormAct(2, top, b, 3, norm=norm) if ("presence" in hc or "scene" in hc) else None

        self.low_proj = ConvNormAct(2, channels[2], 48, 1, norm=norm)
        d = decoder_channels

        def last_blocks() -> nn.ModuleList:
            return nn.ModuleList([ConvNormAct(2, 2 * b + 48, d, 3, norm=norm), ConvNormAct(2, d, d, 3, norm=norm)])

        self.decoder = last_blocks()
        self.classifier = conv(2, d, num_classes, 1)

        self.hog_head = make_hog_head(hc, top)
        self.presence_head = make_class_head(hc, "presence", 2 * b)
        self.scene_head = make_class_head(hc, "scene", 2 * b)
        self.approx_blocks = 0
        self.approx_decoder = None
        self.approx_classifier = None
        if "approx" in hc:
            nb = hc.approx.blocks
            if nb > 2:
                raise ValueError(f"TDSNet: approx blocks must be 1 or 2 (the decoder has two convs), got {nb}")
            self.approx_blocks = nb
            self.approx_decoder = nn.ModuleList(last_blocks()[2 - nb :])
            self.approx_classifier = conv(2, d, hc.approx.num_classes, 1)

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Load a VGG16 state dict (torchvision keys, with or without ``features.``) from ``path``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TDSNet: encoder weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        own = self.features.state_dict()
        picked = {}
        for key in own:
            for cand in (f"features.{key}", key):
                if cand in state:
                    picked[key] = state[cand]
                    break
        missing = sorted(set(own) - set(picked))
        if missing:
            raise ValueError(f"TDSNet: {path} lacks VGG16 encoder weights {missing[:4]}{'...' if len(missing) > 4 else ''}")
        for key, value in picked.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"TDSNet: encoder weight {key} in {path} has shape {tuple(value.shape)}, "
                    f"the model needs {tuple(own[key].shape)} (in_channels/channels must match VGG16)"
                )
        self.features.load_state_dict(picked)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.check_input(x)
        low = self.features[: self.low_level_index](x)
        top = self.features[self.low_level_index :](low)
        ctx = self.context(top)
        seg_cls = self.branch_seg_cls(ctx)
        seg_scene = self.branch_seg_scene(ctx)
        cls_scene = self.branch_cls_scene(ctx) if self.branch_cls_scene is not None else None

        low = self.low_proj(low)
        h = torch.cat([resize_to(torch.cat([seg_cls, seg_scene], dim=1), low.shape[2:]), low], dim=1)
        n_shared = 2 - self.approx_blocks
        for block in self.decoder[:n_shared]:
            h = block(h)
        shared = h
        for block in self.decoder[n_shared:]:
            h = block(h)
        seg = resize_to(self.classifier(h), x.shape[2:])
        approx = None
        if self.approx_decoder is not None:
            a = shared
            for block in self.approx_decoder:
                a = block(a)
            approx = resize_to(self.approx_classifier(a), x.shape[2:])
        presence = scene = None
        if self.presence_head is not None:
            presence = self.presence_head(torch.cat([seg_cls, cls_scene], dim=1))
        if self.scene_head is not None:
            scene = self.scene_head(torch.cat([cls_scene, seg_scene], dim=1))
        return ModelOutput(
            seg=seg,
            side=(),
            hog=(self.hog_head(ctx),) if self.hog_head is not None else (),
            presence=presence,
            scene=scene,
            approx=approx,
        )
