"""Auxiliary heads of the four multi-task methods, and the fixed output structure.

Heads are options, attached by configuration (``create_model(..., heads={...})``):

``hog``
    HOG regression unit of HOG-MTL (Bhattarai et al.): two stages of 3x3 conv + ReLU +
    2x2 max-pool, adaptive average pooling to a fixed grid (so any input size works),
    flatten, one linear layer to the HOG descriptor length (504 for the paper's default
    preset, 864 and 2520 its other sizes; see ``mtseg_kernels.HOG_MTL_PRESETS``). 2D
    only. See :class:`HOGHead` for what comes from where.
``presence``
    Class-presence head (TDSNet's class head, CMU-Net's encoder classifier): global
    average pooling + one linear layer, or two with a hidden width. Logits ``(B, P)``.
``scene``
    Scene head (TDSNet): global average pooling + two linear layers (256 hidden).
    Logits ``(B, num_scenes)``.
``approx``
    Approximation-task output (Ke et al.): a second segmentation output that shares the
    decoder and has its own last blocks. Logits ``(B, K_approx, *S)``.

Every model returns :class:`ModelOutput`, whatever heads are on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import torch
from torch import nn

from .blocks import as_tuple

__all__ = [
    "DEFAULT_HOG_DIM",
    "default_hog_hidden",
    "HEAD_NAMES",
    "ClassHead",
    "HOGHead",
    "ModelOutput",
    "make_class_head",
    "make_hog_head",
    "parse_heads",
]

#: Length of the HOG-MTL default descriptor (128x64 image, 6 orientations, 16x16 cells,
#: 2x2 blocks: 7 * 3 * 2 * 2 * 6 = 504). The paper's other sizes: 864 (12x12 cells,
#: 9 * 4 blocks) and 2520 (8x8 cells, 15 * 7 blocks).
DEFAULT_HOG_DIM = 504
HEAD_NAMES = ("hog", "presence", "scene", "approx")


class ModelOutput(NamedTuple):
    """The named outputs of every model; the same fields whatever heads are configured.

    ``S`` is the input's spatial size, ``(H, W)`` in 2D or ``(D, H, W)`` in 3D.

    Attributes:
        seg: segmentation logits ``(B, K, *S)`` (U2Net: the fused output).
        side: deep-supervision logits, each ``(B, K, *S)``; U2Net's six side outputs
            (stage 1 first), an empty tuple for the other models.
        hog: HOG regressions, each ``(B, hog_dim)``; one per head (one at the UNet
            bottleneck, six on U2Net, decoder stage 1 first), empty when off.
        presence: class-presence logits ``(B, P)`` or ``None``.
        scene: scene logits ``(B, num_scenes)`` or ``None``.
        approx: approximation-task logits ``(B, K_approx, *S)`` or ``None``.
    """

    seg: torch.Tensor
    side: tuple[torch.Tensor, ...] = ()
    hog: tuple[torch.Tensor, ...] = ()
    presence: Optional[torch.Tensor] = None
    scene: Optional[torch.Tensor] = None
    approx: Optional[torch.Tensor] = None


class HOGHead(nn.Module):
    """HOG regression unit of HOG-MTL, input-size agnostic.

    ``conv3x3(C -> h1) + ReLU + maxpool 2x2 -> conv3x3(h1 -> h2) + ReLU + maxpool 2x2
    -> adaptive avg-pool to pool_size -> flatten -> linear(h2 * prod(pool_size) -> dim)``,
    with ``(h1, h2) = (C / 2, C / 4)`` by default. The max-pools round up
    (``ceil_mode``) so a 1x1 feature map still passes.

    Sources. We could not read the paper's Table 1 (the layers of the regression unit): no
    value here is taken from it. Of the paper we could read the abstract (HOG
    pseudo-labels as the labels of an auxiliary task, trained jointly with the
    segmentation, on UNet and U2Net). The layer list follows the authors' public code
    (``thetna/medical_image_segmentation``, its UNet HOG decoder): on the 1024-channel UNet
    bottleneck, conv 1024 -> 512, ReLU, 2x2 max-pool, conv 512 -> 256, ReLU, 2x2 max-pool,
    flatten of a 256 x 4 x 4 map (4096 values: a 16 x 16 bottleneck, 256 x 256 inputs),
    one linear layer to the HOG length. With the defaults this head is that unit on the
    UNet bottleneck at 256 x 256 input (the adaptive pooling is the identity there).
    Our choices: the adaptive pooling (the authors' flatten fixes the input size), the
    widths ``C / 2, C / 4`` on other feature widths, and this same two-stage unit on
    every U2Net stage (the authors' code uses 256-wide units there, with 4x4 pools down
    to an 8 x 8 grid, one to three convs depending on the stage).

    Args:
        in_channels: channels C of the feature map it reads.
        dim: HOG descriptor length (504, 864 or 2520 for the paper's presets).
        hidden: widths ``(h1, h2)`` of the two convs; ``None``: ``(C // 2, C // 4)``, at least 1.
        pool_size: grid of the adaptive average pooling before the linear layer (4: 4 x 4).

    Shapes: ``(B, C, H, W) -> (B, dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int = DEFAULT_HOG_DIM,
        hidden: Sequence[int] | None = None,
        pool_size: int | Sequence[int] = 4,
    ):
        super().__init__()
        if hidden is None:
            hidden = default_hog_hidden(in_channels)
        h1, h2 = hidden
        self.dim = dim
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, h1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(h1, h2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        pool = as_tuple(pool_size, 2, "hog pool_size")
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(h2 * math.prod(pool), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def default_hog_hidden(in_channels: int) -> tuple[int, int]:
    """The HOG unit's conv widths on a ``in_channels``-wide feature: ``(C // 2, C // 4)``, at least 1.

    On the 1024-channel UNet bottleneck: (512, 256), the authors' HOG-MTL unit.
    """
    return max(1, in_channels // 2), max(1, in_channels // 4)


class ClassHead(nn.Module):
    """Global average pooling + one linear layer, or two with ``hidden`` units between.

    Used for class presence (TDSNet: 256 hidden; CMU-Net: none) and scene (256 hidden).
    Shapes: ``(B, C, *S) -> (B, out_features)`` logits.
    """

    def __init__(self, in_channels: int, out_features: int, hidden: int | None = None):
        super().__init__()
        if hidden is None:
            self.mlp = nn.Linear(in_channels, out_features)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(x, 2).mean(dim=2))


def make_hog_head(config: Mapping[str, dict], in_channels: int) -> HOGHead | None:
    """The HOG head from :func:`parse_heads` options, or ``None`` when it is off."""
    if "hog" not in config:
        return None
    o = config["hog"]
    return HOGHead(in_channels, o["dim"], o["hidden"], o["pool_size"])


def make_class_head(config: Mapping[str, dict], name: str, in_channels: int) -> ClassHead | None:
    """The ``presence`` or ``scene`` head from :func:`parse_heads` options, or ``None``."""
    if name not in config:
        return None
    o = config[name]
    return ClassHead(in_channels, o["num_classes"] if name == "presence" else o["num_scenes"], o["hidden"])


# --------------------------------------------------------------------------------------
# Head configuration
# --------------------------------------------------------------------------------------
_HEAD_KEYS = {
    "hog": {"dim", "hidden", "pool_size"},
    "presence": {"num_classes", "hidden"},
    "scene": {"num_scenes", "hidden"},
    "approx": {"num_classes", "blocks"},
}
_SHORTHAND = {"hog": "dim", "presence": "num_classes", "scene": "num_scenes", "approx": "num_classes"}


def _positive_int(who: str, name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def parse_heads(
    heads: Mapping | None,
    *,
    supported: Sequence[str],
    num_classes: int,
    who: str,
    defaults: Mapping[str, Mapping] | None = None,
) -> dict[str, dict]:
    """Normalise ``heads={...}`` into ``{name: options}`` for the heads that are on.

    Each value may be ``True``/``{}`` (defaults), ``False``/``None`` (off), an int
    (shorthand for ``hog`` dim, ``presence``/``approx`` classes, ``scene`` scenes), or a
    dict of options: ``hog: dim (504), hidden (None: half and a quarter of the
    feature width), pool_size (4)``;
    ``presence: num_classes (the model's), hidden (model default)``;
    ``scene: num_scenes (required), hidden (256)``;
    ``approx: num_classes (the model's), blocks (1)``.
    """
    if heads is None:
        return {}
    if not isinstance(heads, Mapping):
        raise TypeError(f"{who}: heads must be a dict like {{'hog': True}}, got {type(heads).__name__}")
    defaults = defaults or {}
    out: dict[str, dict] = {}
    for name, value in heads.items():
        if name not in HEAD_NAMES:
            raise ValueError(f"{who}: unknown head {name!r}; heads are {HEAD_NAMES}")
        if value is None or value is False:
            continue
        if name not in supported:
            raise ValueError(f"{who} has no place for a {name!r} head; it supports {tuple(supported)}")
        if value is True:
            opts = {}
        elif isinstance(value, int) and not isinstance(value, bool):
            opts = {_SHORTHAND[name]: value}
        elif isinstance(value, Mapping):
            opts = dict(value)
        else:
            raise TypeError(f"{who}: head {name!r} must be True/False, an int or a dict of options, got {value!r}")
        unknown = set(opts) - _HEAD_KEYS[name]
        if unknown:
            raise ValueError(f"{who}: head {name!r} has no option(s) {sorted(unknown)}; options: {sorted(_HEAD_KEYS[name])}")
        full = dict(defaults.get(name, {}))
        full.update(opts)
        if name == "hog":
            full.setdefault("dim", DEFAULT_HOG_DIM)
            full.setdefault("hidden", None)
            full.setdefault("pool_size", 4)
            _positive_int(who, "hog dim", full["dim"])
            if full["hidden"] is not None:
                hidden = tuple(full["hidden"])
                if len(hidden) != 2:
                    raise ValueError(f"{who}: hog hidden must be two channel counts, got {full['hidden']!r}")
                for h in hidden:
                    _positive_int(who, "hog hidden", h)
                full["hidden"] = hidden
        elif name == "presence":
            full.setdefault("num_classes", num_classes)
            full.setdefault("hidden", None)
            _positive_int(who, "presence num_classes", full["num_classes"])
            if full["hidden"] is not None:
                _positive_int(who, "presence hidden", full["hidden"])
        elif name == "scene":
            if "num_scenes" not in full:
                raise ValueError(f"{who}: the scene head needs num_scenes, e.g. heads={{'scene': 3}}")
            full.setdefault("hidden", 256)
            _positive_int(who, "scene num_scenes", full["num_scenes"], 2)
            _positive_int(who, "scene hidden", full["hidden"])
        elif name == "approx":
            full.setdefault("num_classes", num_classes)
            full.setdefault("blocks", 1)
            _positive_int(who, "approx num_classes", full["num_classes"])
            _positive_int(who, "approx blocks", full["blocks"])
        out[name] = full
    return out
