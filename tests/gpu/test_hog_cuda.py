"""CUDA kernels of HOG against the CPU kernels (which are tested against skimage).

Skipped, with the reason, where there is no CUDA device or the extension was built
without its CUDA kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mtseg_kernels as mk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from hog_testing import exact_bin  # noqa: E402

pytestmark = pytest.mark.cuda

NORMS = ["L1", "L1-sqrt", "L2", "L2-Hys"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("tsqrt", [False, True], ids=["linear", "sqrt"])
def test_forward_matches_cpu(dtype, norm, tsqrt):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 131, 77)
    images = (images * 255).to(torch.uint8) if dtype == torch.uint8 else images.to(dtype)
    for orientations, ppc, cpb in [(9, (8, 8), (3, 3)), (6, (16, 16), (2, 2)), (7, (5, 7), (2, 3))]:
        cpu = mk.hog(images, orientations, ppc, cpb, norm, tsqrt)
        gpu = mk.hog(images.cuda(), orientations, ppc, cpb, norm, tsqrt)
        assert gpu.dtype == cpu.dtype
        # Same math; the GPU's hypot and sqrt may differ from glibc's by an ulp.
        atol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=atol)


def test_layouts_on_gpu():
    images = torch.rand(4, 3, 96, 80, device="cuda")
    expected = mk.hog(images, 6, 16, 2)
    torch.testing.assert_close(mk.hog(images.to(memory_format=torch.channels_last), 6, 16, 2), expected, rtol=0, atol=0)
    torch.testing.assert_close(mk.hog(images.flip(-1), 6, 16, 2), mk.hog(images.flip(-1).contiguous(), 6, 16, 2))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_matches_cpu(norm):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 48, dtype=torch.float64) + 0.1
    upstream = torch.randn(3, 7, 5, 2, 2, 9, dtype=torch.float64)
    grads = []
    for device in ("cpu", "cuda"):
        x = images.to(device).requires_grad_()
        out = mk.hog(x, 9, 8, 2, norm, feature_vector=False)
        (g,) = torch.autograd.grad((out * upstream.to(device)).sum(), x)
        grads.append(g.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def test_gradcheck_cuda():
    images = (torch.rand(2, 3, 14, 13, dtype=torch.float64, device="cuda") + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mk.hog(x, 5, (4, 3), (2, 2), "L2-Hys", True), (images,))


def test_opcheck_cuda():
    images = torch.rand(2, 3, 33, 26, dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.mtseg.hog.default, (images, 6, [8, 8], [2, 2], "L2-Hys", False))


def test_pseudo_label_preset_on_device():
    """The HOG-MTL preset on both devices from the same resized images (the antialiased
    resize itself need not be bit-identical across devices, so it runs once)."""
    torch.manual_seed(2)
    images = torch.rand(8, 3, 256, 256)
    resized = torch.nn.functional.interpolate(images, size=(128, 64), mode="bilinear", antialias=True)
    cpu = mk.hog(resized, 6, 16, 2)
    gpu = mk.hog(resized.cuda(), 6, 16, 2)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    assert mk.hog_pseudo_label(images.cuda()).shape == (8, 504)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("n", [5, 6, 7, 9, 12, 28, 64])
def test_each_pixel_in_its_exact_bin_on_gpu(n, dtype):
    """Near-edge gradients in 3x3 images: the GPU's bin is the exact one (as on the CPU)."""
    rng = np.random.default_rng(n)
    i = rng.integers(0, n + 1, 300)
    g = np.stack([np.sin(np.pi * i / n), np.cos(np.pi * i / n)], 1) * rng.uniform(0.1, 300, (300, 1))
    g = g.astype(dtype)
    g = g + rng.integers(-3, 4, g.shape).astype(dtype) * np.spacing(g)
    images = np.zeros((300, 1, 3, 3), dtype=dtype)
    images[:, 0, 2, 1], images[:, 0, 1, 2] = g[:, 0], g[:, 1]
    cells = mk.hog_cells(torch.from_numpy(images).cuda(), n, (3, 3))[:, 0, 0].cpu().numpy()
    for (r, c), cell in zip(g.astype(np.float64), cells):
        if r == 0 and c == 0:
            continue
        assert int(np.argmax(cell)) == exact_bin(r, c, n), (n, r.hex(), c.hex())


def test_non_finite_image_is_nan_on_gpu_without_sync():
    """No host sync: a NaN/Inf image gets an all-NaN descriptor and gradient; the others
    are unaffected (the CPU raises ValueError instead)."""
    images = torch.rand(3, 3, 64, 64, device="cuda", dtype=torch.float64)
    images[1, 1, 5, 5] = float("nan")
    out = mk.hog(images)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]].cpu(), mk.hog(images[[0, 2]].cpu()), rtol=0, atol=1e-10)
    x = images.clone().requires_grad_()
    mk.hog(x).sum().backward()
    assert x.grad[1].isnan().all() and not x.grad[[0, 2]].isnan().any()
    neg = torch.rand(2, 1, 32, 32, device="cuda") - 0.5
    assert mk.hog(neg, 9, 8, 2, transform_sqrt=True).isnan().all()


def test_cuda_orientation_limit():
    with pytest.raises(ValueError, match="at most 64 orientations"):
        mk.hog(torch.rand(1, 1, 64, 64, device="cuda"), 65, 8, 2)


def test_forward_backward_capture_in_cuda_graph():
    """No host synchronisation inside: the forward and backward capture in a CUDA graph
    and replay to the eager result."""
    images = torch.rand(4, 3, 128, 64, device="cuda", requires_grad=True)
    upstream = torch.randn(4, 504, device="cuda")

    def step():
        out = mk.hog(images, 6, 16, 2)
        (g,) = torch.autograd.grad(out, images, upstream)
        return out, g

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grad = step()
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grad = step()
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)
