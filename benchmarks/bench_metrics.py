"""Speed of the surface metrics (``mtseg_kernels.surface_metrics``) against MONAI's, in the
same run.

Groups (each one pytest-benchmark group):

* ``surface-2d-4x256-8cls``: label maps, 4 images of 256x256, 8 classes (7 foreground
  classes of random blobs), HD, HD95 and ASSD per image and class.
* ``surface-3d-96x160x160-4cls``: one 96x160x160 label volume, 4 classes, spacing
  (1.5, 0.9375, 0.9375).
* ``surface-hc18-8x540x800``: 8 HC18 head masks at full size against the same masks
  eroded by 4 px, each image with its own pixel size (per-image spacing).

Contestants: mtseg (one call: all three metrics, every image and class); MONAI 1.6
``compute_hausdorff_distance(percentile=95)`` alone (HD95 only: its fastest way to one of
the three numbers); MONAI's three calls for HD, HD95 and symmetric ASD (what mtseg
returns). MONAI gets one-hot float input, its documented layout; on the CPU it finds
nearest surface voxels with a KD-tree (scipy), one image and class at a time.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from bench_distance import hc18_masks
from scipy import ndimage as ndi

import mtseg_kernels as mk

SLOW_ROUNDS = 3
SPACING_3D = (1.5, 0.9375, 0.9375)


def _labels(rng, shape, classes, density, iterations):
    out = np.zeros(shape, np.int64)
    for c in range(1, classes):
        out[ndi.binary_dilation(rng.random(shape) < density, iterations=iterations)] = c
    return out


@functools.lru_cache(maxsize=None)
def _case(name):
    """(pred, target, num_classes, spacing) as torch tensors / lists."""
    rng = np.random.default_rng(0)
    if name == "surface-2d-4x256-8cls":
        shape, classes = (4, 256, 256), 8
        pred, target = (_labels(rng, shape, classes, 3e-4, 8) for _ in range(2))
        return torch.from_numpy(pred), torch.from_numpy(target), classes, None
    if name == "surface-3d-96x160x160-4cls":
        shape, classes = (1, 96, 160, 160), 4
        pred, target = (_labels(rng, shape, classes, 2e-5, 8) for _ in range(2))
        return torch.from_numpy(pred), torch.from_numpy(target), classes, SPACING_3D
    masks = hc18_masks(8)
    eroded = ndi.binary_erosion(masks, np.ones((1, 9, 9), bool))
    pixel = [[0.1 + 0.01 * i] * 2 for i in range(8)]  # HC18 pixel sizes lie around 0.05-0.25 mm
    return torch.from_numpy(eroded.astype(np.int64)), torch.from_numpy(masks.astype(np.int64)), 2, pixel


CASES = ["surface-2d-4x256-8cls", "surface-3d-96x160x160-4cls", "surface-hc18-8x540x800"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return (request.param, *_case(request.param))


def _describe(benchmark, runtime_info, group, contestant, role, pred, classes, **extra):
    benchmark.group = group
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(contestant=contestant, role=role, device="cpu", input_dtype=str(pred.dtype),
                                n_images=pred.shape[0], image_size="x".join(map(str, pred.shape[1:])),
                                num_classes=classes, **extra)


def _onehot(x, classes):
    return torch.nn.functional.one_hot(x, classes).movedim(-1, 1).float()


def _monai(pred, target, classes, spacing, all_three):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, t = _onehot(pred, classes), _onehot(target, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)
        if not all_three:
            return hd95
        hd = compute_hausdorff_distance(p, t, spacing=spacing)
        asd = compute_average_surface_distance(p, t, symmetric=True, spacing=spacing)
    return hd, hd95, asd


def test_surface_mtseg(benchmark, runtime_info, case):
    group, pred, target, classes, spacing = case
    _describe(benchmark, runtime_info, group, "mtseg.surface_metrics (CPU, HD+HD95+ASSD)", "mtseg", pred, classes)
    out = benchmark(mk.surface_metrics, pred, target, spacing, num_classes=classes)
    # equal to MONAI (float32) on the first image
    first = spacing[:1] if spacing is not None and isinstance(spacing[0], list) else spacing
    ref = _monai(pred[:1], target[:1], classes, first, True)
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got[:1].numpy(), want.double().numpy(), rtol=2e-6, atol=2e-5)


def test_surface_monai_hd95(benchmark, runtime_info, case):
    pytest.importorskip("monai")
    group, pred, target, classes, spacing = case
    _describe(benchmark, runtime_info, group, "MONAI compute_hausdorff_distance (HD95 only)", "peer", pred, classes)
    benchmark.pedantic(_monai, (pred, target, classes, spacing, False), rounds=SLOW_ROUNDS, iterations=1)


def test_surface_monai_all(benchmark, runtime_info, case):
    pytest.importorskip("monai")
    group, pred, target, classes, spacing = case
    _describe(benchmark, runtime_info, group, "MONAI HD + HD95 + symmetric ASD (3 calls)", "peer", pred, classes)
    benchmark.pedantic(_monai, (pred, target, classes, spacing, True), rounds=SLOW_ROUNDS, iterations=1)
