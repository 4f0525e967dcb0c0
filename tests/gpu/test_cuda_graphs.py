"""Every op can be captured in a CUDA graph, and replaying the graph on new input data
gives what an eager call on that data gives.

Capture fails on any host synchronisation inside an op (``.item()``, a blocking copy, a
data-dependent shape), so this is also the test that the ops never stall the device in a
training step. Each case is captured once, then replayed on two fresh inputs copied into
the captured input tensors; the reference is the eager op on the same fresh inputs.
Skipped, with the reason, where there is no CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import mtseg_kernels as mk

pytestmark = pytest.mark.cuda

Inputs = Callable[[torch.Generator], Sequence[torch.Tensor]]


def _capture_and_replay(fn: Callable[..., Sequence[torch.Tensor]], make_inputs: Inputs) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    static = [t.cuda() for t in make_inputs(gen)]
    # Warm up on a side stream (Triton compiles, caches fill), as torch.cuda.graph requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)

    for _ in range(2):
        fresh = [t.cuda() for t in make_inputs(gen)]
        for dst, src in zip(static, fresh):
            with torch.no_grad():
                dst.copy_(src)
        graph.replay()
        expected = fn(*fresh)
        torch.cuda.synchronize()
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, equal_nan=True)


def _images(gen, shape=(4, 3, 96, 80)):
    return [torch.rand(shape, generator=gen)]


def _logits(gen, shape=(2, 5, 24, 32)):
    return [torch.randn(shape, generator=gen), torch.randn(shape[:2], generator=gen)]


def _labels(gen, shape=(3, 40, 48), k=6):
    labels = torch.randint(0, k, shape, generator=gen)
    labels[:, :4] = 255  # ignored voxels
    return [labels]


def _mask(gen, shape=(3, 40, 56), p=0.9, dtype=torch.bool):
    return [(torch.rand(shape, generator=gen) < p).to(dtype)]


def _blobs(gen, shape=(2, 48, 64)):
    """Segmentation S (a few rectangles) and seeds inside it."""
    seg = torch.zeros(shape, dtype=torch.bool)
    seeds = torch.zeros(shape, dtype=torch.int64)
    for b in range(shape[0]):
        for k in range(1, 4):
            r, c = (int(v) for v in torch.randint(0, 32, (2,), generator=gen))
            seg[b, r : r + 14, c : c + 20] = True
            seeds[b, r + 6, c + 8] = k
    return [seeds, seg]


def _hog_grad(images: torch.Tensor):
    x = images.detach().requires_grad_()
    out = mk.hog(x, 6, 16, 2)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    return out.detach(), grad


def _sync_grad(seg: torch.Tensor, cls: torch.Tensor, mode: str, direction: str):
    s, c = seg.detach().requires_grad_(), cls.detach().requires_grad_()
    loss = mk.sync_loss(s, c, mode=mode, direction=direction)
    grads = torch.autograd.grad(loss, [s, c], allow_unused=True)
    return (loss.detach(), *[g for g in grads if g is not None])


CASES: dict[str, tuple[Callable, Inputs]] = {
    "hog": (lambda x: (mk.hog(x, 9, 8, 3),), _images),
    "hog_float64": (lambda x: (mk.hog(x.double(), 6, 16, 2, "L1"),), _images),
    "hog_forward_backward": (_hog_grad, _images),
    "hog_pseudo_label": (lambda x: (mk.hog_pseudo_label(x),), lambda g: _images(g, (4, 3, 200, 150))),
    "class_counts": (lambda y: (mk.class_counts(y, 6, ignore_index=255),), _labels),
    "presence_from_labels": (lambda y: (mk.presence_from_labels(y, 6, ignore_index=255),), _labels),
    **{
        f"soft_presence_{mode}": ((lambda m: lambda s, c: (mk.soft_presence(s, mode=m),))(mode), _logits)
        for mode in ("max", "noisy_or", "smooth_max", "hard")
    },
    "sync_loss_hard": ((lambda s, c: _sync_grad(s, c, "hard", "seg_to_class")), _logits),
    "sync_loss_max_both": ((lambda s, c: _sync_grad(s, c, "max", "both")), _logits),
    "sync_loss_noisy_or_both": ((lambda s, c: _sync_grad(s, c, "noisy_or", "both")), _logits),
    "edt": (lambda m: (mk.edt(m, (0.5, 1.5)),), _mask),
    "edt_float_mask_3d": (lambda m: (mk.edt(m, squared=True),), lambda g: _mask(g, (2, 9, 20, 24), dtype=torch.float32)),
    "levelset_grow": (lambda a, s: (mk.levelset_grow(a, s, 1.5),), lambda g: [_mask(g, p=0.02)[0], _mask(g, p=0.7)[0]]),
    "connected_components": (lambda m: tuple(mk.connected_components(m, 8)), lambda g: _mask(g, p=0.55)),
    "connected_components_3d": (lambda m: tuple(mk.connected_components(m, 26)), lambda g: _mask(g, (2, 8, 16, 16), 0.3)),
    "grow_instances": (lambda seeds, seg: tuple(mk.grow_instances(seeds, seg, 2.0)), _blobs),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_in_cuda_graph(case):
    fn, make_inputs = CASES[case]
    _capture_and_replay(fn, make_inputs)
