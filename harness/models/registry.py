"""``create_model(name, ...)`` and the registry of model names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .heads import HEAD_NAMES, Heads
from .tdsnet import TDSNet
from .u2net import U2Net
from .unet import anisotropic_unet3d, cmunet, unet

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: its builder and what it supports.

    ``heads`` lists the heads the architecture can carry (``hog`` needs 2D inputs).
    """

    name: str
    builder: Callable[..., nn.Module]
    spatial_dims: tuple[int, ...]
    heads: tuple[str, ...]
    defaults: Mapping
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, builder: Callable[..., nn.Module], *, spatial_dims=(2, 3),
                   heads=HEAD_NAMES, defaults: Mapping | None = None,
                   description: str = "") -> None:
    """Add an architecture under ``name``; ``defaults`` are keyword arguments of ``builder``."""
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, builder, tuple(spatial_dims), tuple(heads), dict(defaults or {}), description)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, num_classes: int, heads: Heads | Mapping | None = None,
                 spatial_dims: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        in_channels: input channels C.
        num_classes: segmentation classes K.
        heads: a :class:`~mtseg_harness.models.heads.Heads` or its mapping form, e.g.
            ``{"hog": True, "presence": True, "scene": 3, "approx": True}``.
        spatial_dims: 2 or 3; default: the first the model supports (2, or 3 for
            ``unet3d_aniso``).
        **kwargs: architecture options (widths, upsampling, config, ...).

    Returns:
        an ``nn.Module`` whose forward maps ``(B, C, *S)`` to a
        :class:`~mtseg_harness.models.heads.ModelOutput`.
    """
    spec = get_model_spec(name)
    if spatial_dims is None:
        spatial_dims = spec.spatial_dims[0]
    if spatial_dims not in spec.spatial_dims:
        raise ValueError(f"model {name!r} supports spatial_dims {spec.spatial_dims}, got {spatial_dims!r}")
    options = {**spec.defaults, **kwargs}
    model = spec.builder(in_channels, num_classes, spatial_dims=spatial_dims, heads=heads, **options)
    model.model_name = name
    return model


register_model("unet", unet, defaults={"upsampling": "transpose"},
               description="UNet (Ronneberger et al. 2015), transposed-conv upsampling")
register_model("unet_bilinear", unet, defaults={"upsampling": "bilinear"},
               description="UNet with (bi/tri)linear upsampling + 1x1 conv")
register_model("u2net", U2Net, defaults={"config": "full"}, description="U^2-Net full (Qin et al. 2020)")
register_model("u2net_lite", U2Net, defaults={"config": "lite"}, description="U^2-Net lite (U2NETP)")
register_model("tdsnet", TDSNet, spatial_dims=(2,), description="TDSNet (Ren et al. 2020): VGG16, one context-ensemble stack per task pair, ASPP decoder")
register_model("unet3d_aniso", anisotropic_unet3d, spatial_dims=(3,), heads=("presence", "scene", "approx"),
               description="anisotropic 3D UNet for BraTS crops 19x144x144 (1x3x3 + 3x1x1 convs)")
register_model("cmunet", cmunet, description="CMU-Net UNet (Moseley et al.): 16-256, instance norm, LeakyReLU 0.2")
