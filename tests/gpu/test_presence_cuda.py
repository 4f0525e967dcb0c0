"""Triton (CUDA) presence kernels against the CPU kernels (which are tested against the
float64 reference). Skipped, with the reason, where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

import mtseg_kernels as mk

pytestmark = pytest.mark.cuda

MODES = ("max", "noisy_or", "smooth_max", "hard")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 12, 64, 64), (2, 4, 32, 32, 19), (1, 40, 333)], ids=str)
def test_forward_and_backward_match_cpu(activation, mode, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) if activation == "none" else torch.randn(shape, generator=g) * 3
    x = x.to(dtype)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.8
    cpu = mk.soft_presence(x, mode, activation, 0.2, 0.5, mask)
    gpu = mk.soft_presence(x.cuda(), mode, activation, 0.2, 0.5, mask.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5 if dtype != torch.float64 else 1e-12, rtol=0)
    if mode == "hard":
        return
    grad = torch.randn(shape[:2], generator=g)
    xc = x.clone().requires_grad_(True)
    xg = x.cuda().requires_grad_(True)
    (gc,) = torch.autograd.grad(mk.soft_presence(xc, mode, activation, 0.2, 0.5, mask), xc, grad.to(cpu.dtype))
    (gg,) = torch.autograd.grad(
        mk.soft_presence(xg, mode, activation, 0.2, 0.5, mask.cuda()), xg, grad.to(cpu.dtype).cuda()
    )
    torch.testing.assert_close(gg.cpu().double(), gc.double(), atol=1e-5, rtol=1e-3)


def test_counts_and_sync_loss_match_cpu():
    labels = torch.randint(0, 12, (4, 70, 90))
    labels[0, :5] = 255
    assert torch.equal(mk.class_counts(labels.cuda(), 12, 255).cpu(), mk.class_counts(labels, 12, 255))
    seg = torch.randn(4, 12, 70, 90)
    cls = torch.randn(4, 12)
    for direction in ["seg_to_class", "class_to_seg", "both"]:
        cpu = mk.sync_loss(seg, cls, "max", direction)
        gpu = mk.sync_loss(seg.cuda(), cls.cuda(), "max", direction)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_bad_label_on_cuda_is_named():
    labels = torch.zeros(2, 8, 8, dtype=torch.int64, device="cuda")
    labels[1, 3, 3] = 17
    with pytest.raises(ValueError, match="holds the label 17"):
        mk.class_counts(labels, 5)
