"""mtseg-kernels: exact, batched PyTorch operators for the auxiliary labels of
multi-task medical image segmentation.

Importing the package loads the compiled extension, which registers the operators
under ``torch.ops.mtseg``, and their fake kernels and autograd formulas.

>>> import torch, mtseg_kernels
>>> mtseg_kernels.hog(torch.rand(2, 3, 128, 64), 6, 16, 2).shape
torch.Size([2, 504])
"""

from __future__ import annotations

import os

import torch  # first: the extension links against libtorch


def _load_extension(path: str):
    """Load ``_C`` from an explicit file (``MTSEG_EXTENSION``): ``make sanitize`` runs the
    tests against its AddressSanitizer build this way, leaving the normal build in place."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{__name__}._C", path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f"MTSEG_EXTENSION={path!r} is not an extension module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


try:
    if os.environ.get("MTSEG_EXTENSION"):
        _C = _load_extension(os.environ["MTSEG_EXTENSION"])
    else:
        from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "mtseg_kernels._C (the compiled operators) is missing or does not match this torch. "
        "Build it with `pip install --no-build-isolation -e .` (or `make test`) from the source tree."
    ) from exc

from .metrics import (
    SurfaceDistance,
    SurfaceDistanceMetric,
    SurfaceMetrics,
    average_surface_distance,
    hausdorff_distance,
    surface_metrics,
)
from .ops.distance import (
    EDT,
    GrownInstances,
    LevelSetGrow,
    connected_components,
    edt,
    grow_instances,
    levelset_grow,
    signed_edt,
)
from .ops.hog import HOG, HOG_MTL_PRESETS, HOGPreset, hog, hog_blocks, hog_cells, hog_output_shape, hog_pseudo_label
from .ops.presence import (
    SoftPresence,
    SyncLoss,
    class_counts,
    presence_from_labels,
    soft_presence,
    sync_loss,
    valid_mask_from_labels,
)

__version__ = "0.1.0"

__all__ = [
    "EDT",
    "GrownInstances",
    "HOG",
    "HOG_MTL_PRESETS",
    "HOGPreset",
    "LevelSetGrow",
    "SoftPresence",
    "SurfaceDistance",
    "SurfaceDistanceMetric",
    "SurfaceMetrics",
    "SyncLoss",
    "average_surface_distance",
    "backends",
    "class_counts",
    "connected_components",
    "edt",
    "grow_instances",
    "hausdorff_distance",
    "hog",
    "hog_blocks",
    "hog_cells",
    "hog_output_shape",
    "hog_pseudo_label",
    "levelset_grow",
    "presence_from_labels",
    "signed_edt",
    "soft_presence",
    "surface_metrics",
    "sync_loss",
    "valid_mask_from_labels",
]


def backends() -> dict[str, bool]:
    """Which kernels this build has and which can run here.

    Returns a dict: ``cpu`` (always True), ``cuda_compiled`` (the extension was built
    with its CUDA kernels), ``cuda_available`` (compiled and a CUDA device is present).
    """
    compiled = set(_C.compiled_backends())
    return {
        "cpu": "cpu" in compiled,
        "cuda_compiled": "cuda" in compiled,
        "cuda_available": "cuda" in compiled and torch.cuda.is_available(),
    }
