"""TDSNet (Ren et al., "Task decomposition and synchronization for semantic biomedical
image segmentation", IEEE TIP 2020), 2D.

Layout (``S`` = input size, ``b`` = ``branch_channels``, ``d`` = ``decoder_channels``)::

    image (B, C, S) -> VGG16 encoder (output stride 8) -> top (B, 512, S/8)
    top -> context["seg_cls"]   -> (B, b, S/8) --+-- segmentation latent (2b) -> ASPP decoder -> seg (B, K, S)
    top -> context["seg_scene"] -> (B, b, S/8) --+                            \\-> hog head (optional)
    top -> context["cls_scene"] -> (B, b, S/8)
    class head: GAP(seg_cls + cls_scene) -> FC 256 -> FC K     (presence logits)
    scene head: GAP(seg_scene + cls_scene) -> FC 256 -> FC N   (scene logits)

* **Task-pair context ensembles.** The three sub-tasks (segmentation, class, scene) are
  coupled in pairs; each pair has its own context-ensemble module, and each task decodes
  from the two modules of the pairs it belongs to (``+`` above is concatenation).
* **Context-ensemble module** (:class:`ContextEnsemble`): a 1x1 projection to ``b``
  channels, then a *stack* of five 3x3 convolutions with dilations 1, 2, 4, 8, 16, each
  reading the previous one's output; the module returns the sum of the projected input
  and the five outputs. The "rates 1, 3, 7, 15, 31, 63" of the TDSNet description are the
  receptive fields of these six summed paths, in feature pixels per axis: path ``k``
  sees ``1 + 2 * (d_1 + ... + d_k)`` = 1, 3, 7, 15, 31, 63 (tested by impulse
  response). They are *not* per-convolution dilations: one 3x3 conv with dilation 63
  would see 3 pixels 63 apart, with holes between them.
* **Decoder** without encoder skip connections (the TDSNet design: the segmentation
  decodes from the latent space alone): an atrous spatial pyramid (:class:`ASPP`:
  1x1 conv, 3x3 convs at ``aspp_rates``, image pooling; concatenated and projected), a
  3x3 conv, a 1x1 classifier at stride 8 and bilinear upsampling to the input size.
* **Encoder**: VGG16 (13 3x3 convs, widths 64-128-256-512-512, no batch norm), laid out
  like torchvision's ``vgg16().features`` so a torchvision state dict loads by key
  (``encoder_weights=path``; nothing is ever downloaded). Without weights the encoder
  trains from scratch and a warning says so: TDSNet's encoder is meant to start from
  ImageNet weights, which also expect ImageNet-normalised RGB input. Pools 4 and 5 are
  identities and block 5 is dilated by 2 (DeepLab-style), so the output stride is 8.

Values the paper's text (not available to us) may set differently are our choices,
listed in ``docs/fidelity-notes-models.md``: the 1x1 projection and width ``b = 256``
inside each context module (the authors' public code runs its dilated stack at 256
channels), batch norm in the added layers, output stride 8, ASPP rates (12, 24, 36)
(DeepLabv3's rates at output stride 8), ``d = 256``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import ConvNormAct, conv, resize_to
from .heads import ModelOutput, make_class_head, make_hog_head

__all__ = ["ASPP", "ContextEnsemble", "TASK_PAIRS", "TDSNet", "VGG16_LAYOUT"]

log = logging.getLogger("mtseg_harness.models")

#: torchvision's VGG16 "D" layout: block index of each conv, "M" = max-pool.
VGG16_LAYOUT = (0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4, "M")
#: The task pairs of TDSNet, one context-ensemble module each.
TASK_PAIRS = ("seg_cls", "seg_scene", "cls_scene")


class ContextEnsemble(nn.Module):
    """Stacked dilated 3x3 convs whose outputs are summed with their input (TDSNet).

    ``y0 = x`` (or a 1x1 projection of ``x`` when ``in_channels != channels``),
    ``y_k = act(norm(conv_{d_k}(y_{k-1})))`` with dilations ``d = 1, 2, 4, 8, 16``; ``y_k``
    sees ``1 + 2 * (d_1 + ... + d_k)`` pixels per axis: 1, 3, 7, 15, 31, 63.
    Output ``y0 + y1 + ... + y5``. Shapes: ``(B, in_channels, H, W) -> (B, channels, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        dilations: Sequence[int] = (1, 2, 4, 8, 16),
        norm: str | None = "batch",
        spatial_dims: int = 2,
        in_channels: int | None = None,
    ):
        super().__init__()
        in_channels = channels if in_channels is None else in_channels
        self.project = (
            ConvNormAct(spatial_dims, in_channels, channels, 1, norm=norm) if in_channels != channels else nn.Identity()
        )
        self.convs = nn.ModuleList(
            ConvNormAct(spatial_dims, channels, channels, 3, dilation=d, norm=norm) for d in dilations
        )

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[y0, y1, ..., y5]``, each ``(B, channels, H, W)``."""
        out = [self.project(x)]
        for c in self.convs:
            out.append(c(out[-1]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(x)
        total = h
        for c in self.convs:
            h = c(h)
            total = total + h
        return total


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLabv3), 2D.

    Parallel branches on the same input: a 1x1 conv, one 3x3 conv per rate in ``rates``
    (dilation = rate), and image pooling (global average, 1x1 conv, broadcast back). The
    ``2 + len(rates)`` outputs are concatenated and projected by a 1x1 conv. The pooling
    branch has a bias and no norm: it holds one value per channel and image, which batch
    norm cannot normalise at batch size 1.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (12, 24, 36),
                 norm: str | None = "batch"):
        super().__init__()
        rates = tuple(rates)
        if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
            raise ValueError(f"ASPP: rates must be one or more ints >= 1, got {rates!r}")
        self.rates = rates
        self.branches = nn.ModuleList(
            [ConvNormAct(2, in_channels, out_channels, 1, norm=norm)]
            + [ConvNormAct(2, in_channels, out_channels, 3, dilation=r, norm=norm) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = ConvNormAct(2, (len(rates) + 2) * out_channels, out_channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        feats.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(feats, dim=1))


class TDSNet(SegmentationModel):
    """TDSNet with its class (presence) and scene heads, 2D; see the module docstring.

    Args:
        in_channels: input channels C (3 for VGG weights).
        num_classes: segmentation classes K.
        channels: VGG widths of blocks 1-5 (default 64, 128, 256, 512, 512; narrower for
            tests; loading weights needs the default).
        branch_channels: width ``b`` of each task-pair context-ensemble module (256).
        decoder_channels: width of the ASPP and decoder convs (256).
        dilations: dilations of the stacked convs of each context module (1, 2, 4, 8, 16).
        aspp_rates: dilation rates of the decoder's ASPP (12, 24, 36).
        norm: norm of the added layers (context, ASPP, decoder); VGG has none.
        encoder_weights: optional path to a VGG16 state dict (torchvision keys
            ``features.N.weight``/``bias``, or the same without the prefix). ``None``:
            random init, with a warning (the encoder trains from scratch).
        heads: ``presence`` (GAP + FC 256 + FC K by default), ``scene`` (needs
            ``num_scenes``), ``hog`` (on the segmentation latent), ``approx`` (its own
            copy of the decoder's last ``blocks``, 1 = the 3x3 conv, 2 = ASPP too, and a
            classifier). The ``cls_scene`` module is built only for the class or scene head.

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
        dilations: Sequence[int] = (1, 2, 4, 8, 16),
        aspp_rates: Sequence[int] = (12, 24, 36),
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
        if encoder_weights is not None:
            self.load_encoder_weights(encoder_weights)
        else:
            log.warning(
                "TDSNet: no encoder_weights given: the VGG16 encoder starts from random weights and trains "
                "from scratch; TDSNet is meant to start from ImageNet weights: pass encoder_weights=<path of a "
                "local torchvision VGG16 state dict, e.g. vgg16-397923af.pth> (nothing is downloaded)"
            )

        top = channels[4]
        b = branch_channels
        hc = self.head_config
        # the class-scene pair only feeds the class and scene heads
        pairs = TASK_PAIRS if ("presence" in hc or "scene" in hc) else TASK_PAIRS[:2]
        self.context = nn.ModuleDict(
            {name: ContextEnsemble(b, dilations, norm=norm, in_channels=top) for name in pairs}
        )

        d = decoder_channels

        def last_blocks() -> nn.ModuleList:
            return nn.ModuleList([ASPP(2 * b, d, aspp_rates, norm=norm), ConvNormAct(2, d, d, 3, norm=norm)])

        self.decoder = last_blocks()
        self.classifier = conv(2, d, num_classes, 1)

        self.hog_head = make_hog_head(hc, 2 * b)
        self.presence_head = make_class_head(hc, "presence", 2 * b)
        self.scene_head = make_class_head(hc, "scene", 2 * b)
        self.approx_blocks = 0
        self.approx_decoder = None
        self.approx_classifier = None
        if "approx" in hc:
            nb = hc.approx.blocks
            if nb > 2:
                raise ValueError(f"TDSNet: approx blocks must be 1 or 2 (the decoder is ASPP + one conv), got {nb}")
            self.approx_blocks = nb
            self.approx_decoder = nn.ModuleList(last_blocks()[2 - nb :])
            self.approx_classifier = conv(2, d, hc.approx.num_classes, 1)

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Load a VGG16 state dict (torchvision keys, with or without ``features.``) from ``path``.

        Only the 13 conv layers are read (the classifier keys of a torchvision file are
        ignored); a missing key or a shape that differs is a ``ValueError``.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TDSNet: encoder weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"TDSNet: {path} holds a {type(state).__name__}, not a state dict")
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
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[key].shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"TDSNet: encoder weight {key} in {path} has shape {got}, "
                    f"the model needs {tuple(own[key].shape)} (in_channels/channels must match VGG16)"
                )
        self.features.load_state_dict(picked)
        log.info("TDSNet: VGG16 encoder weights loaded from %s (%d tensors)", path, len(picked))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.check_input(x)
        top = self.features(x)
        ctx = {name: module(top) for name, module in self.context.items()}
        latent = torch.cat([ctx["seg_cls"], ctx["seg_scene"]], dim=1)

        h = latent
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
            presence = self.presence_head(torch.cat([ctx["seg_cls"], ctx["cls_scene"]], dim=1))
        if self.scene_head is not None:
            scene = self.scene_head(torch.cat([ctx["seg_scene"], ctx["cls_scene"]], dim=1))
        return ModelOutput(
            seg=seg,
            side=(),
            hog=(self.hog_head(latent),) if self.hog_head is not None else (),
            presence=presence,
            scene=scene,
            approx=approx,
        )
