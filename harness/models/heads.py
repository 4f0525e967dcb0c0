"""Auxiliary heads of the four multi-task methods, and the fixed output structure.

Heads are options, attached by configuration: ``create_model(..., heads=...)`` takes a
:class:`Heads` (one typed spec per head, the form methods use) or the same as a mapping
(the form configs use, ``{"hog": True, "scene": 3}``, parsed once by :meth:`Heads.parse`).
The head specs below hold every head's options and defaults; :data:`HEAD_NAMES` is the
one list of heads, the fields of :class:`Heads`.

``hog``
    HOG regression unit of HOG-MTL (Bhattarai et al.): two stages of 3x3 conv + ReLU +
    2x2 max-pool, adaptive average pooling to a fixed grid (so any input size works),
    flatten, one linear layer to the HOG descriptor length (504 by default, 864 and 2520
    the other HOG-MTL presets; see ``mtseg_kernels.HOG_MTL_PRESETS``). 2D
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

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import typing
from typing import ClassVar, NamedTuple, Optional, Union

import torch
from torch import nn

import mtseg_kernels

from .blocks import as_tuple

__all__ = [
    "DEFAULT_HOG_DIM",
    "default_hog_hidden",
    "HEAD_NAMES",
    "ApproxHeadSpec",
    "ClassHead",
    "HOGHead",
    "HOGHeadSpec",
    "Heads",
    "ModelOutput",
    "PresenceHeadSpec",
    "SceneHeadSpec",
    "make_class_head",
    "make_hog_head",
]

#: Length of the HOG-MTL default descriptor: the default of ``mtseg_kernels.hog_pseudo_label``
#: (128x64 image, 6 orientations, 16x16 cells, 2x2 blocks: 7 * 3 * 2 * 2 * 6 = 504). The other
#: presets: 864 (12x12 cells, 9 * 4 blocks) and 2520 (8x8 cells, 15 * 7 blocks). Those three
#: sizes are HOG-MTL's as the project's issue 12 lists them, not checked against the paper
#: (its full text was not available; docs/fidelity/hogmtl.md, row "HOG length").
DEFAULT_HOG_DIM: int = inspect.signature(mtseg_kernels.hog_pseudo_label).parameters["dim"].default


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
        dim: HOG descriptor length (504, 864 or 2520 for the HOG-MTL presets).
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


# --------------------------------------------------------------------------------------
# Head specs: the options of each head, with their defaults
# --------------------------------------------------------------------------------------
def _positive_int(who: str, name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class HOGHeadSpec:
    """HOG regression unit: descriptor length ``dim`` (one of ``mtseg_kernels.HOG_MTL_PRESETS``
    for HOG-MTL targets), the two conv widths ``hidden`` (``None``: half and a quarter of the
    feature width, the authors' unit on the UNet bottleneck), the pooled grid ``pool_size``."""

    shorthand: ClassVar[str] = "dim"  # the option a bare int sets: heads={"hog": 3}

    dim: int = DEFAULT_HOG_DIM
    hidden: Optional[tuple[int, int]] = None  # None: (C // 2, C // 4) of the feature width C
    pool_size: Union[int, tuple[int, int]] = 4

    def check(self, who: str) -> None:
        _positive_int(who, "hog dim", self.dim)
        if self.hidden is None:
            return
        if len(tuple(self.hidden)) != 2:
            raise ValueError(f"{who}: hog hidden must be two channel counts, got {self.hidden!r}")
        for h in self.hidden:
            _positive_int(who, "hog hidden", h)


@dataclass(frozen=True)
class PresenceHeadSpec:
    """Class presence: ``num_classes`` outputs (``None``: the model's K); ``hidden`` width
    (``"default"``: the architecture's choice, TDSNet 256, the UNet family none; ``None``:
    one linear layer)."""

    shorthand: ClassVar[str] = "num_classes"  # the option a bare int sets: heads={"presence": 3}

    num_classes: Optional[int] = None
    hidden: Union[int, None, str] = "default"

    def check(self, who: str) -> None:
        if self.num_classes is not None:
            _positive_int(who, "presence num_classes", self.num_classes)
        if self.hidden not in (None, "default"):
            _positive_int(who, "presence hidden", self.hidden)


@dataclass(frozen=True)
class SceneHeadSpec:
    """Scene classification (TDSNet): ``num_scenes`` outputs, ``hidden`` width."""

    shorthand: ClassVar[str] = "num_scenes"  # the option a bare int sets: heads={"scene": 3}

    num_scenes: int
    hidden: int = 256

    def check(self, who: str) -> None:
        _positive_int(who, "scene num_scenes", self.num_scenes, 2)
        _positive_int(who, "scene hidden", self.hidden)


@dataclass(frozen=True)
class ApproxHeadSpec:
    """Approximation output (Ke et al.): ``num_classes`` (``None``: the model's K) and the
    number of last decoder ``blocks`` it owns."""

    shorthand: ClassVar[str] = "num_classes"  # the option a bare int sets: heads={"approx": 3}

    num_classes: Optional[int] = None
    blocks: int = 1

    def check(self, who: str) -> None:
        if self.num_classes is not None:
            _positive_int(who, "approx num_classes", self.num_classes)
        _positive_int(who, "approx blocks", self.blocks)


@dataclass(frozen=True)
class Heads:
    """The heads of a model: a spec per head that is on, ``None`` for one that is off.

    >>> Heads(hog=HOGHeadSpec(dim=3780)).names()
    ('hog',)
    >>> Heads.parse({"presence": True, "scene": 3}).scene
    SceneHeadSpec(num_scenes=3, hidden=256)
    """

    hog: Optional[HOGHeadSpec] = None
    presence: Optional[PresenceHeadSpec] = None
    scene: Optional[SceneHeadSpec] = None
    approx: Optional[ApproxHeadSpec] = None

    def names(self) -> tuple[str, ...]:
        """The heads that are on, in :data:`HEAD_NAMES` order."""
        return tuple(n for n in HEAD_NAMES if getattr(self, n) is not None)

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None

    @classmethod
    def parse(cls, heads, who: str = "heads") -> "Heads":
        """A :class:`Heads` from ``None``, a :class:`Heads` or a config mapping (see :meth:`updated`)."""
        if heads is None:
            return cls()
        if isinstance(heads, Heads):
            return heads
        return cls().updated(heads, who)

    def updated(self, heads, who: str = "heads") -> "Heads":
        """These heads with ``heads`` laid over them, head by head.

        ``heads``: a :class:`Heads` (its heads that are on replace these) or a mapping
        name -> ``True``/``{}`` (the spec's defaults), ``False``/``None`` (off), an int
        (shorthand: ``hog`` dim, ``presence``/``approx`` classes, ``scene`` scenes), a
        dict of the spec's options, or a spec.
        """
        if isinstance(heads, Heads):
            return dataclasses.replace(self, **{n: getattr(heads, n) for n in heads.names()})
        if not isinstance(heads, Mapping):
            raise TypeError(f"{who}: heads must be a dict like {{'hog': True}}, got {type(heads).__name__}")
        out = {}
        for name, value in heads.items():
            if name not in HEAD_NAMES:
                raise ValueError(f"{who}: unknown head {name!r}; heads are {HEAD_NAMES}")
            out[name] = _head_spec(name, value, who)
        return dataclasses.replace(self, **out)

    def resolved(self, num_classes: int, who: str, *, supported: Sequence[str] = (),
                 presence_hidden: Optional[int] = None) -> "Heads":
        """Every option filled in for a model with ``num_classes`` classes, and checked.

        ``supported``: the heads the architecture has a place for; ``presence_hidden``: its
        default hidden width of the presence head.
        """
        for name in self.names():
            if name not in supported:
                raise ValueError(f"{who} has no place for a {name!r} head; it supports {tuple(supported)}")
            getattr(self, name).check(who)
        out = {}
        if self.hog is not None:
            out["hog"] = dataclasses.replace(self.hog, hidden=None if self.hog.hidden is None else tuple(self.hog.hidden))
        if self.presence is not None:
            p = self.presence
            out["presence"] = dataclasses.replace(
                p, num_classes=num_classes if p.num_classes is None else p.num_classes,
                hidden=presence_hidden if p.hidden == "default" else p.hidden)
        if self.approx is not None:
            a = self.approx
            out["approx"] = dataclasses.replace(a, num_classes=num_classes if a.num_classes is None else a.num_classes)
        return dataclasses.replace(self, **out)


#: The heads there are, in one place: the fields of :class:`Heads`.
HEAD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Heads))
_SPEC_TYPES = {name: typing.get_args(t)[0] for name, t in typing.get_type_hints(Heads).items()}


def _head_spec(name: str, value, who: str):
    """One head's spec from its config value (see :meth:`Heads.updated`); ``None`` = off."""
    spec = _SPEC_TYPES[name]
    if value is None or value is False:
        return None
    if isinstance(value, spec):
        return value
    if value is True:
        opts = {}
    elif isinstance(value, int) and not isinstance(value, bool):
        opts = {spec.shorthand: value}
    elif isinstance(value, Mapping):
        opts = dict(value)
    else:
        raise TypeError(f"{who}: head {name!r} must be True/False, an int or a dict of options, got {value!r}")
    known = [f.name for f in dataclasses.fields(spec)]
    unknown = set(opts) - set(known)
    if unknown:
        raise ValueError(f"{who}: head {name!r} has no option(s) {sorted(unknown)}; options: {sorted(known)}")
    if name == "scene" and "num_scenes" not in opts:
        raise ValueError(f"{who}: the scene head needs num_scenes, e.g. heads={{'scene': 3}}")
    return spec(**opts)


def make_hog_head(heads: Heads, in_channels: int) -> HOGHead | None:
    """The HOG head of resolved :class:`Heads`, or ``None`` when it is off."""
    if heads.hog is None:
        return None
    o = heads.hog
    return HOGHead(in_channels, o.dim, o.hidden, o.pool_size)


def make_class_head(heads: Heads, name: str, in_channels: int) -> ClassHead | None:
    """The ``presence`` or ``scene`` head of resolved :class:`Heads`, or ``None``."""
    o = getattr(heads, name)
    if o is None:
        return None
    return ClassHead(in_channels, o.num_classes if name == "presence" else o.num_scenes, o.hidden)
