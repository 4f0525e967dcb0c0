"""Triton (CUDA) presence kernels against the CPU kernels (which are tested against the
float64 reference), and the properties only a GPU run can show: float64 parameters,
NaN handling of compiled reductions, no host synchronisation, CUDA graph capture, the
device guard, determinism. Skipped, with the reason, where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

import mtseg_kernels as mk
from mtseg_kernels.ops.presence import check_label_errors

pytestmark = pytest.mark.cuda

MODES = ("max", "noisy_or", "smooth_max", "hard", "argmax")
HARD_MODES = ("hard", "argmax")


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
    if mode in HARD_MODES:
        return
    grad = torch.randn(shape[:2], generator=g)
    xc = x.clone().requires_grad_(True)
    xg = x.cuda().requires_grad_(True)
    (gc,) = torch.autograd.grad(mk.soft_presence(xc, mode, activation, 0.2, 0.5, mask), xc, grad.to(cpu.dtype))
    (gg,) = torch.autograd.grad(
        mk.soft_presence(xg, mode, activation, 0.2, 0.5, mask.cuda()), xg, grad.to(cpu.dtype).cuda()
    )
    torch.testing.assert_close(gg.cpu().double(), gc.double(), atol=1e-5, rtol=1e-3)


def test_float64_smooth_max_and_threshold_are_doubles():
    # A float32 temperature would be off by ~3e-9; a float32 threshold 0.1 + 1e-12 rounds
    # to 0.1 and lets p = 0.1 through.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 40, 40, generator=g, dtype=torch.float64)
    for t in (0.1, 0.3, 1e-300):
        cpu = mk.soft_presence(x, "smooth_max", temperature=t)
        torch.testing.assert_close(mk.soft_presence(x.cuda(), "smooth_max", temperature=t).cpu(), cpu, atol=1e-13,
                                   rtol=0)
    p = torch.full((1, 1, 8), 0.1, dtype=torch.float64)
    assert mk.soft_presence(p.cuda(), "hard", "none", threshold=0.1 - 1e-12).item() == 1.0
    assert mk.soft_presence(p.cuda(), "hard", "none", threshold=0.1 + 1e-12).item() == 0.0


def test_nan_logits_match_the_cpu():
    x = torch.randn(2, 4, 50, 70)
    x[0, 2, 10, 10] = float("nan")  # softmax: every class NaN at that voxel
    x[1, 0, 3, 3] = float("nan")
    for mode in MODES:
        for activation in ("softmax", "sigmoid"):
            cpu = mk.soft_presence(x, mode, activation)
            gpu = mk.soft_presence(x.cuda(), mode, activation).cpu()
            assert torch.equal(cpu.isnan(), gpu.isnan()), (mode, activation)
            torch.testing.assert_close(gpu.nan_to_num(), cpu.nan_to_num(), atol=1e-5, rtol=0)


def test_max_backward_is_deterministic_when_classes_share_a_voxel():
    x = torch.full((8, 16, 4096), 0.1).cuda()
    x[:, :, 77] = 0.9  # every class has its maximum at voxel 77
    grad = torch.randn(8, 16).cuda()
    _, stats = torch.ops.mtseg.soft_presence_forward(x, "max", "none", 0.1, 0.5, None)
    first = torch.ops.mtseg.soft_presence_backward(grad, x, stats, "max", "none", 0.1, None)
    for _ in range(20):
        assert torch.equal(torch.ops.mtseg.soft_presence_backward(grad, x, stats, "max", "none", 0.1, None), first)
    cpu = torch.ops.mtseg.soft_presence_backward(grad.cpu(), x.cpu(), stats.cpu(), "max", "none", 0.1, None)
    torch.testing.assert_close(first.cpu(), cpu)


def test_ops_do_not_synchronise_the_device():
    x = torch.randn(4, 6, 64, 64, device="cuda", requires_grad=True)
    cls = torch.randn(4, 6, device="cuda", requires_grad=True)
    labels = torch.randint(0, 6, (4, 64, 64), device="cuda")
    mask = labels != 5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("max", "noisy_or", "smooth_max"):
            mk.sync_loss(x, cls, mode, "both", valid_mask=mask).backward()
        mk.sync_loss(x, cls, "argmax")
        mk.presence_from_labels(labels, 6, 5)
        mk.class_counts(labels, 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_label_errors()


def test_presence_ops_capture_in_a_cuda_graph():
    x = torch.randn(4, 6, 64, 64, device="cuda")
    grad = torch.randn(4, 6, device="cuda")
    labels = torch.randint(0, 6, (4, 64, 64), device="cuda")
    outs = {}

    def step():
        for mode in ("max", "noisy_or", "smooth_max", "argmax"):
            p, stats = torch.ops.mtseg.soft_presence_forward(x, mode, "softmax", 0.2, 0.5, None)
            outs[mode] = p
            if mode != "argmax":
                outs[mode + "-grad"] = torch.ops.mtseg.soft_presence_backward(grad, x, stats, mode, "softmax", 0.2,
                                                                              None)
        outs["counts"] = torch.ops.mtseg.class_counts(labels, 6, -100)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn(4, 6, 64, 64, device="cuda"))
    labels.copy_(torch.randint(0, 6, (4, 64, 64), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for mode in ("max", "noisy_or", "smooth_max", "argmax"):
        p, stats = torch.ops.mtseg.soft_presence_forward(x, mode, "softmax", 0.2, 0.5, None)
        assert torch.equal(outs[mode], p), mode
    assert torch.equal(outs["counts"], mk.class_counts(labels, 6))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_the_second_device():
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    with torch.cuda.device(0):
        for mode in MODES:
            got = mk.soft_presence(x.to("cuda:1"), mode)
            assert got.device == torch.device("cuda:1")
            torch.testing.assert_close(got.cpu(), mk.soft_presence(x, mode), atol=1e-5, rtol=0)
        assert torch.equal(mk.class_counts(labels.to("cuda:1"), 3).cpu(), mk.class_counts(labels, 3))


def test_counts_and_sync_loss_match_cpu():
    labels = torch.randint(0, 12, (4, 70, 90))
    labels[0, :5] = 255
    assert torch.equal(mk.class_counts(labels.cuda(), 12, 255).cpu(), mk.class_counts(labels, 12, 255))
    u8 = torch.randint(0, 200, (3, 37, 29), dtype=torch.uint8)
    assert torch.equal(mk.class_counts(u8.cuda(), 200).cpu(), mk.class_counts(u8, 200))
    seg = torch.randn(4, 12, 70, 90)
    cls = torch.randn(4, 12)
    for mode in ("max", "noisy_or", "smooth_max"):
        for direction in ["seg_to_class", "class_to_seg", "both"]:
            cpu = mk.sync_loss(seg, cls, mode, direction)
            gpu = mk.sync_loss(seg.cuda(), cls.cuda(), mode, direction)
            torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    for mode in HARD_MODES:
        torch.testing.assert_close(mk.sync_loss(seg.cuda(), cls.cuda(), mode).cpu(), mk.sync_loss(seg, cls, mode))


def test_bad_label_on_cuda_is_named_after_the_kernel():
    labels = torch.zeros(2, 8, 8, dtype=torch.int64, device="cuda")
    labels[1, 3, 3] = 17
    mk.class_counts(labels, 5)  # returns without waiting for the kernel
    with pytest.raises(ValueError, match="image 1 holds the label 17"):
        check_label_errors(wait=True)
