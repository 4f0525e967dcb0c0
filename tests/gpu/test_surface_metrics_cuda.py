"""Surface metrics on CUDA tensors against the same call on the CPU (which is tested
against MONAI in tests/ops/test_surface_metrics.py). Skipped, with the reason, where
there is no CUDA device or the extension was built without its CUDA kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import mtseg_kernels as mk

pytestmark = pytest.mark.cuda


def _labels(seed, shape, classes):
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.int64)
    for c in range(1, classes):
        out[ndi.binary_dilation(rng.random(shape) < 0.003, iterations=3)] = c
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(3, 60, 70), (2, 12, 30, 34)])
def test_formats_and_per_image_spacing_match_cpu(shape):
    pred, target = _labels(0, shape, 4), _labels(1, shape, 4)
    spatial = len(shape) - 1
    per_image = [[0.5 + 0.25 * i] * spatial for i in range(shape[0])]
    onehot = lambda x: torch.nn.functional.one_hot(x, 4).movedim(-1, 1)  # noqa: E731
    for args, kwargs in [((pred, target, per_image), dict(num_classes=4)),
                         ((onehot(pred), onehot(target), [1.0] * spatial), dict(format="onehot")),
                         ((pred == 1, target == 1, None), dict(format="mask"))]:
        cpu = mk.surface_metrics(*args, **kwargs)
        gpu = mk.surface_metrics(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        for a, b in zip(gpu, cpu):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b, equal_nan=True)


def test_metric_class_on_cuda_and_label_check():
    metric = mk.SurfaceDistanceMetric(num_classes=4, reduction="mean_batch")
    ref = mk.SurfaceDistanceMetric(num_classes=4, reduction="mean_batch")
    for seed in range(3):
        p, t = _labels(seed, (2, 40, 40), 4), _labels(seed + 10, (2, 40, 40), 4)
        metric(p.cuda(), t.cuda())
        ref(p, t)
    for a, b in zip(metric.aggregate(), ref.aggregate()):
        torch.testing.assert_close(a, b, equal_nan=True)
    bad = torch.zeros(1, 8, 8, dtype=torch.int64, device="cuda")
    bad[0, 1, 1] = 7
    with pytest.raises(ValueError, match="holds label 7"):
        mk.surface_metrics(bad, bad, num_classes=4)
