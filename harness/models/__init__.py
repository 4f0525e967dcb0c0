"""Segmentation models of the harness, with optional multi-task heads.

>>> import torch
>>> from mtseg_harness.models import create_model
>>> model = create_model("unet", in_channels=1, num_classes=2, heads={"hog": True, "presence": True},
...                      channels=(8, 16, 32))
>>> out = model(torch.randn(2, 1, 64, 48))
>>> tuple(out.seg.shape), tuple(out.hog[0].shape), tuple(out.presence.shape), out.scene
((2, 2, 64, 48), (2, 504), (2, 2), None)

Every model returns :class:`ModelOutput` (``seg``, ``side``, ``hog``, ``presence``,
``scene``, ``approx``), the same structure whatever heads are configured.
"""

from .base import SegmentationModel
from .blocks import ConvNormAct, DoubleConv
from .heads import (DEFAULT_HOG_DIM, HEAD_NAMES, ApproxHeadSpec, ClassHead, Heads, HOGHead, HOGHeadSpec, ModelOutput,
                    PresenceHeadSpec, SceneHeadSpec)
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model
from .tdsnet import ContextEnsemble, TDSNet
from .u2net import RSU, RSU4F, U2Net
from .unet import UNet, anisotropic_pool_schedule, anisotropic_unet3d, cmunet, unet

__all__ = [
    "DEFAULT_HOG_DIM",
    "HEAD_NAMES",
    "ApproxHeadSpec",
    "HOGHeadSpec",
    "Heads",
    "PresenceHeadSpec",
    "SceneHeadSpec",
    "RSU",
    "RSU4F",
    "ClassHead",
    "ContextEnsemble",
    "ConvNormAct",
    "DoubleConv",
    "HOGHead",
    "ModelOutput",
    "ModelSpec",
    "SegmentationModel",
    "TDSNet",
    "U2Net",
    "UNet",
    "anisotropic_pool_schedule",
    "anisotropic_unet3d",
    "cmunet",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
    "unet",
]
