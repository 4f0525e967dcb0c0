"""CUDA kernels of HOG against the CPU kernels (which are tested against skimage).

Skipped, with the reason, where there is no CUDA device or the extension was built
without its CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

import mtseg_kernels as mk

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


def test_pseudo_label_on_device():
    images = torch.rand(8, 3, 256, 256, device="cuda")
    torch.testing.assert_close(mk.hog_pseudo_label(images).cpu(), mk.hog_pseudo_label(images.cpu()), rtol=0, atol=1e-5)


def test_non_finite_raises_on_gpu():
    images = torch.rand(1, 3, 64, 64, device="cuda")
    images[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.hog(images)
