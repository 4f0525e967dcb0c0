"""Presence from labels, soft presence and the sync loss against the plain-PyTorch
reference (mtseg_kernels/reference/presence.py: softmax then reduce, in float64), on
the CPU kernels and on the Triton launchers (interpreter on a CPU machine)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtseg_kernels as mk
from mtseg_kernels.reference import presence as ref

MODES = ("max", "noisy_or", "smooth_max", "hard", "argmax")
HARD_MODES = ("hard", "argmax")
SOFT_MODES = ("max", "noisy_or", "smooth_max")
ACTIVATIONS = ("softmax", "sigmoid", "none")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def make_input(shape, activation, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    if activation == "none":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.98
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x.to(dtype)


def make_mask(shape, seed=0, p=0.7):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand((shape[0], *shape[2:]), generator=g) < p


# The interpreter evaluates log(0) = -inf (the winner's log(1 - p) where the other classes
# underflow) with numpy, which warns; the kernels rely on that -inf.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


def triton_presence():
    pytest.importorskip("triton")
    from mtseg_kernels.triton import presence

    return presence


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(4, 17, 23), (2, 5, 9, 7), (1, 1, 1)])
def test_class_counts_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 7, shape, generator=g).to(dtype)
    labels.view(-1)[:: 5] = 250  # ignored
    got = mk.class_counts(labels, 7, ignore_index=250)
    assert got.dtype == torch.int64 and got.shape == (shape[0], 7)
    assert torch.equal(got, ref.class_counts(labels, 7, 250))
    assert torch.equal(got.sum(1), (labels != 250).reshape(shape[0], -1).sum(1))


def test_class_counts_ignore_index_inside_the_class_range_is_not_counted():
    labels = torch.tensor([[0, 0, 1, 2, 2, 2]])
    assert mk.class_counts(labels, 3, ignore_index=0).tolist() == [[0, 1, 3]]


def test_presence_from_labels_hand_built():
    labels = torch.tensor([[[0, 0, 2], [2, 2, 255]], [[1, 1, 1], [1, 1, 0]]])
    assert mk.presence_from_labels(labels, 4, ignore_index=255).tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert mk.presence_from_labels(labels, 4, ignore_index=255, min_count=2).tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]
    assert mk.presence_from_labels(labels, 4, 255).dtype == torch.float32


def test_presence_from_labels_is_cmunet_max_over_one_hot():
    labels = torch.randint(0, 5, (3, 8, 8, 4))
    one_hot = torch.nn.functional.one_hot(labels, 5).amax(dim=(1, 2, 3)).float()  # C = max(Y)
    assert torch.equal(mk.presence_from_labels(labels, 5), one_hot)


def test_class_counts_names_the_bad_label():
    labels = torch.zeros(2, 4, 4, dtype=torch.int64)
    labels[1, 2, 3] = 9
    with pytest.raises(ValueError, match=r"image 1 holds the label 9 .*\[0, 5\) or ignore_index = 255"):
        mk.class_counts(labels, 5, ignore_index=255)
    labels[1, 2, 3] = -1
    with pytest.raises(ValueError, match="label -1"):
        torch.ops.mtseg.class_counts(labels, 5, 255)


@pytest.mark.parametrize(
    "labels, match, exc",
    [
        (torch.zeros(4, 4), "integer labels", TypeError),
        (torch.zeros(4, dtype=torch.int64), r"\(B, \*spatial\)", ValueError),
        (torch.zeros(1, 2, 2, 2, 2, dtype=torch.int64), r"\(B, \*spatial\)", ValueError),
        (torch.zeros(0, 3, 3, dtype=torch.int64), "at least one image", ValueError),
    ],
)
def test_label_ops_reject_bad_input(labels, match, exc):
    with pytest.raises(exc, match=match):
        mk.class_counts(labels, 3)
    with pytest.raises(exc, match=match):
        torch.ops.mtseg.class_counts(labels, 3, -100)


def test_label_ops_reject_bad_num_classes_and_min_count():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        mk.class_counts(torch.zeros(1, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        mk.presence_from_labels(torch.zeros(1, 3, dtype=torch.int64), 2, min_count=0)


# --------------------------------------------------------------------------------------
# Soft presence: forward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape", [(1, 1, 13, 11), (16, 3, 9, 10), (2, 40, 7, 6), (2, 4, 5, 6, 7), (3, 2, 300)], ids=str
)
@pytest.mark.parametrize("masked", [False, True])
def test_soft_presence_matches_reference(activation, mode, shape, masked):
    x = make_input(shape, activation, torch.float32, seed=len(shape) + shape[1])
    mask = make_mask(shape) if masked else None
    got = mk.soft_presence(x, mode, activation, 0.2, 0.5, mask)
    want = ref.soft_presence(x, mode, activation, 0.2, 0.5, mask)
    assert got.shape == shape[:2] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_soft_presence_dtypes(dtype, mode):
    x = make_input((4, 6, 12, 12), "softmax", dtype, seed=5)
    got = mk.soft_presence(x, mode)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # half inputs are computed in float32 on the rounded values: compare on those values
    torch.testing.assert_close(got.double(), ref.soft_presence(x, mode), atol=TOL[dtype], rtol=0)


def test_soft_presence_strided_input_equals_contiguous():
    base = make_input((3, 12, 20, 6), "softmax")
    x = base.permute(0, 3, 2, 1)[:, ::2]  # (3, 3, 20, 12), non-contiguous
    for mode in MODES:
        assert torch.equal(mk.soft_presence(x, mode), mk.soft_presence(x.contiguous(), mode))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    k=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    mode=st.sampled_from(MODES),
    activation=st.sampled_from(ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_soft_presence_random_shapes(b, k, spatial, mode, activation, seed):
    shape = (b, k, *spatial)
    x = make_input(shape, activation, torch.float64, seed=seed, scale=4.0)
    mask = make_mask(shape, seed)
    torch.testing.assert_close(
        mk.soft_presence(x, mode, activation, 0.3, 0.5, mask), ref.soft_presence(x, mode, activation, 0.3, 0.5, mask)
    )


def test_soft_presence_chunks_merge_in_order():
    # Over 2048 voxels per image the CPU kernel works in several chunks; the maximum and its
    # index must be the first one in raster order even when it repeats in later chunks.
    x = torch.full((1, 2, 10000), -5.0, dtype=torch.float64)
    x[0, 0, [3000, 4500, 9999]] = 5.0
    p, stats = torch.ops.mtseg.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    assert stats[0, 0, 0].item() == 3000
    assert p[0, 0].item() == pytest.approx(torch.softmax(torch.tensor([5.0, -5.0], dtype=torch.float64), 0)[0].item())


def test_max_picks_the_true_maximum_among_float32_rounding_ties():
    # p = 1 - 2e-9 at voxel 1 and 1 - 1.4e-11 at voxel 3 both round to 1.0 in float32; the
    # maximum (and its gradient and exact complement) belongs to voxel 3.
    x = torch.zeros(1, 2, 5)
    x[0, 0, 1], x[0, 0, 3] = 20.0, 25.0
    p, stats = torch.ops.mtseg.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    assert p[0, 0].item() == 1.0 and stats[0, 0, 0].item() == 3
    assert stats[0, 0, 1].item() == pytest.approx(math.exp(-25.0) / (1 + math.exp(-25.0)), rel=1e-5)
    tp = triton_presence()
    _, tstats = tp.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    assert tstats[0, 0, 0].item() == 3


def test_soft_presence_is_deterministic_across_thread_counts():
    x = make_input((3, 5, 70, 90), "softmax", torch.float32, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [mk.soft_presence(x, m) for m in MODES]
        torch.set_num_threads(max(2, threads))
        many = [mk.soft_presence(x, m) for m in MODES]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# TDSNet semantics and extreme inputs
# --------------------------------------------------------------------------------------
def test_tdsnet_rule_on_a_hand_built_case():
    # 3 classes on a 2x2 image; class 0 wins at one pixel with p = 0.6; class 1 wins at
    # another pixel but never exceeds 0.5 (0.45, 0.35, 0.2); class 2 is everywhere below 0.5.
    probs = torch.tensor(
        [
            [[0.6, 0.1], [0.2, 0.3]],
            [[0.3, 0.45], [0.4, 0.35]],
            [[0.1, 0.45], [0.4, 0.35]],
        ]
    ).unsqueeze(0)
    logits = probs.log()  # softmax(log p) = p
    got = mk.soft_presence(logits, "hard", "softmax", threshold=0.5)
    assert got.tolist() == [[1.0, 0.0, 0.0]]
    assert mk.soft_presence(probs, "hard", "none").tolist() == [[1.0, 0.0, 0.0]]
    assert not got.requires_grad


@pytest.mark.parametrize("mode", HARD_MODES)
def test_hard_modes_have_no_gradient(mode):
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    assert not mk.soft_presence(x, mode).requires_grad
    presence, _ = torch.ops.mtseg.soft_presence_forward(x, mode, "softmax", 0.1, 0.5, None)
    with pytest.raises(RuntimeError, match="no gradient"):
        presence.sum().backward()
    with pytest.raises(ValueError, match="has no gradient"):
        torch.ops.mtseg.soft_presence_backward(torch.ones(1, 3), x.detach(), torch.zeros(1, 3, 2, dtype=torch.float64),
                                               mode, "softmax", 0.1, None)


@pytest.mark.parametrize("mode", MODES)
def test_huge_logits_stay_finite(mode):
    x = torch.full((2, 3, 8, 8), -1e4)
    x[:, 1, 2, 3] = 1e4  # class 1 certain at one voxel, class 0 certain elsewhere
    x[:, 0] = torch.where(x[:, 1] > 0, -1e4, 1e4)
    x.requires_grad_(True)
    p = mk.soft_presence(x, mode)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.double(), ref.soft_presence(x.detach(), mode), atol=1e-6, rtol=0)
    if mode != "smooth_max":  # smooth max is a soft mean: one certain voxel of 64 is not 1
        assert p[:, :2].tolist() == [[1.0, 1.0]] * 2 and p[:, 2].tolist() == [0.0, 0.0]
    if mode not in HARD_MODES:
        (grad,) = torch.autograd.grad(p.sum(), x)
        assert torch.isfinite(grad).all()


def test_noisy_or_is_exact_for_ten_million_tiny_probabilities():
    # p = sigmoid(-20) ~ 2e-9 at 10^7 voxels: sum log(1 - p) ~ -0.02. A float32 product or
    # log(1 - p) with 1 - p rounded would return 0.
    n = 10_000_000
    x = torch.full((1, 1, n), -20.0)
    exact = -math.expm1(n * math.log1p(-1.0 / (1.0 + math.exp(20.0))))
    got = mk.soft_presence(x, "noisy_or", "sigmoid").item()
    assert got == pytest.approx(exact, rel=1e-5)
    # The same with softmax: class 0 holds 1 - 2e-9 everywhere.
    x2 = torch.stack([torch.zeros(n), torch.full((n,), -20.0)]).unsqueeze(0)
    got2 = mk.soft_presence(x2, "noisy_or", "softmax")
    assert got2[0, 1].item() == pytest.approx(exact, rel=1e-5)
    assert got2[0, 0].item() == 1.0


@pytest.mark.slow
def test_noisy_or_on_a_256_cubed_volume_has_no_nan_or_inf():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 256, 256, 256, generator=g) * 30
    x.requires_grad_(True)
    p = mk.soft_presence(x, "noisy_or")
    (grad,) = torch.autograd.grad(p.sum(), x)
    assert torch.isfinite(p).all() and torch.isfinite(grad).all()
    assert p.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("mode", MODES)
def test_all_ignored_image_gives_zero_presence_and_zero_gradient(mode):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    mask[1] = False
    p = mk.soft_presence(x, mode, valid_mask=mask)
    assert p[1].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(p[0], ref.soft_presence(x[:1], mode)[0])
    if mode not in HARD_MODES:
        (grad,) = torch.autograd.grad(p.sum(), x)
        assert grad[1].abs().max().item() == 0.0


def test_single_class_and_single_voxel():
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    for mode in SOFT_MODES:  # softmax over one class is 1 everywhere: presence 1, no gradient
        p = mk.soft_presence(x, mode)
        assert p.tolist() == [[1.0]] * 3
        (grad,) = torch.autograd.grad(p.sum(), x)
        assert grad.abs().max().item() == 0.0
    v = torch.randn(2, 4, 1, dtype=torch.float64)
    for mode in MODES:
        torch.testing.assert_close(mk.soft_presence(v, mode), ref.soft_presence(v, mode))


def test_nan_propagates():
    x = torch.randn(1, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    for mode in SOFT_MODES:
        assert mk.soft_presence(x, mode).isnan().all(), mode
    assert not mk.soft_presence(x, "hard").isnan().any()


# --------------------------------------------------------------------------------------
# Soft presence: gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", SOFT_MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_soft_presence_gradcheck(activation, mode, masked):
    shape = (2, 3, 4, 5)
    x = make_input(shape, activation, torch.float64, seed=7, scale=1.0)
    if activation == "none":
        x = x * 0.8 + 0.05
    x.requires_grad_(True)
    mask = make_mask(shape, 3) if masked else None
    assert torch.autograd.gradcheck(lambda t: mk.soft_presence(t, mode, activation, 0.3, 0.5, mask), (x,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", SOFT_MODES)
def test_soft_presence_gradient_matches_reference(activation, mode):
    shape = (16, 6, 40, 30)  # several chunks per image
    x = make_input(shape, activation, torch.float32, seed=9)
    mask = make_mask(shape, 9)
    g = torch.randn(shape[:2], generator=torch.Generator().manual_seed(2))
    xa = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(mk.soft_presence(xa, mode, activation, 0.2, 0.5, mask), xa, g)
    xr = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(ref.soft_presence(xr, mode, activation, 0.2, 0.5, mask), xr, g.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-4)


def test_half_input_gets_half_gradient():
    x = make_input((2, 4, 8, 8), "softmax", torch.bfloat16).requires_grad_(True)
    (grad,) = torch.autograd.grad(mk.soft_presence(x, "smooth_max").sum(), x)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------
# Sync loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["seg_to_class", "class_to_seg", "both"])
@pytest.mark.parametrize("mode", SOFT_MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_loss_matches_reference(direction, mode, reduction, dtype):
    shape = (3, 4, 5, 6)  # noisy-or within float32 rounding of 1 in some classes
    # 1 - q reaches 1e-10 here: dL/dq ~ 1/(1 - q) amplifies rounding of dq/dz in both
    # implementations, hence the float64 tolerance of 1e-6 relative on the gradient.
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-6)
    seg = make_input(shape, "softmax", dtype, seed=1).requires_grad_(True)
    cls = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=dtype).requires_grad_(True)
    weight = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=dtype)
    got = mk.sync_loss(seg, cls, mode, direction, reduction, weight, temperature=0.2)
    want = ref.sync_loss(seg, cls, mode, direction, reduction, weight, temperature=0.2)
    torch.testing.assert_close(got.double(), want, **tol)
    g = torch.ones_like(got)
    got_grads = torch.autograd.grad(got, (seg, cls), g, allow_unused=True)
    want_grads = torch.autograd.grad(want, (seg, cls), g.double(), allow_unused=True)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), **tol)
    assert (got_grads[0] is None) == (direction == "seg_to_class")
    assert (got_grads[1] is None) == (direction == "class_to_seg")


@pytest.mark.parametrize("mode", ["max", "noisy_or"])
def test_sync_loss_class_to_seg_on_a_confident_segmentation(mode):
    # Class 0 wins everywhere by 30 logits (1 - p ~ 1e-13, below float32's resolution of 1)
    # and noisy-or over 4096 voxels is 1 - 1e-300: q rounds to 1 in float32 and float64.
    # The loss must still see log(1 - q) exactly, as the reference computes it from the
    # other classes' probabilities, and its gradient must be finite.
    seg = torch.full((2, 3, 64, 64), -15.0)
    seg[:, 0] = 15.0
    seg[1, 1, 10, 10] = 20.0
    seg += torch.rand(seg.shape, generator=torch.Generator().manual_seed(0))  # no ties for max
    seg.requires_grad_(True)
    cls = torch.tensor([[0.0, -2.0, 1.0], [3.0, 0.5, -1.0]], requires_grad=True)
    got = mk.sync_loss(seg, cls, mode, "class_to_seg", "none")
    want = ref.sync_loss(seg, cls, mode, "class_to_seg", "none")
    assert torch.isfinite(got).all() and got.max() < 100
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), seg)
    (want_grad,) = torch.autograd.grad(want.sum(), seg)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), want_grad.double(), atol=1e-5, rtol=1e-4)


def test_sync_loss_default_is_the_paper():
    # hard presence of the segmentation as the BCE target of the class head; seg untouched.
    seg = torch.randn(2, 3, 8, 8, requires_grad=True)
    cls = torch.randn(2, 3, requires_grad=True)
    loss = mk.sync_loss(seg, cls)
    target = (torch.softmax(seg.detach(), 1) > 0.5).flatten(2).any(2).float()
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy_with_logits(cls, target))
    loss.backward()
    assert seg.grad is None and cls.grad is not None


def test_sync_loss_rejects_bad_arguments():
    seg, cls = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="mode='hard' has no gradient"):
        mk.sync_loss(seg, cls, "hard", "both")
    with pytest.raises(ValueError, match="mode='hard' has no gradient"):
        torch.ops.mtseg.sync_loss(seg, cls, "hard", "class_to_seg")
    with pytest.raises(ValueError, match="direction must be one of"):
        mk.sync_loss(seg, cls, "max", "sideways")
    with pytest.raises(ValueError, match=r"class_logits of shape \(B, K\) = \(2, 3\); got \(2, 4\)"):
        mk.sync_loss(seg, torch.randn(2, 4), "max")
    with pytest.raises(ValueError, match=r"class_logits of shape \(B, K\)"):
        torch.ops.mtseg.sync_loss(seg, torch.randn(3, 3), "max")
    with pytest.raises(ValueError, match=r"weight of shape \(K,\)"):
        mk.sync_loss(seg, cls, "max", weight=torch.ones(4))
    with pytest.raises(ValueError, match="reduction must be"):
        mk.sync_loss(seg, cls, "max", reduction="avg")


def test_sync_loss_keeps_no_softmax_for_backward():
    # What autograd saves for the fused loss: the input (alive anyway) and O(B*K) tensors.
    seg = torch.randn(2, 5, 64, 64, requires_grad=True)
    cls = torch.randn(2, 5, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.sync_loss(seg, cls, "noisy_or", "both")
    big = [t for t in saved if t.numel() > 2 * 5 * 2 and t.data_ptr() != seg.data_ptr()]
    assert big == [], [tuple(t.shape) for t in big]


# --------------------------------------------------------------------------------------
# Modules, bad input, operator checks, torch.compile
# --------------------------------------------------------------------------------------
def test_modules():
    x = torch.randn(2, 3, 8, 8, 4)
    torch.testing.assert_close(mk.SoftPresence("smooth_max", temperature=0.05)(x), mk.soft_presence(x, "smooth_max", temperature=0.05))
    loss = mk.SyncLoss(mode="max", direction="both", weight=torch.tensor([1.0, 2.0, 3.0]))
    assert "weight" in dict(loss.named_buffers())
    cls = torch.randn(2, 3)
    torch.testing.assert_close(loss(x, cls), mk.sync_loss(x, cls, "max", "both", weight=torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="mode must be one of"):
        mk.SoftPresence("mean")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(input=torch.randn(3, 4)), ValueError, r"\(B, K, \*spatial\)"),
        (dict(input=torch.randint(0, 3, (1, 2, 4, 4))), TypeError, "floating-point"),
        (dict(input=torch.randn(0, 2, 4, 4)), ValueError, "at least one"),
        (dict(input=torch.randn(1, 2, 4, 4), mode="mean"), ValueError, "mode must be one of"),
        (dict(input=torch.randn(1, 2, 4, 4), activation="relu"), ValueError, "activation must be"),
        (dict(input=torch.randn(1, 2, 4, 4), mode="smooth_max", temperature=0.0), ValueError, "temperature > 0"),
        (dict(input=torch.randn(1, 2, 4, 4), valid_mask=torch.ones(1, 4, 4)), TypeError, "bool tensor"),
        (dict(input=torch.randn(1, 2, 4, 4), valid_mask=torch.ones(1, 4, 5, dtype=torch.bool)), ValueError,
         r"\(B, \*spatial\) = .1, 4, 4"),
    ],
)
def test_soft_presence_rejects_bad_input(kwargs, exc, match):
    full = dict(mode="max", activation="softmax", temperature=0.1, threshold=0.5, valid_mask=None) | kwargs
    with pytest.raises(exc, match=match):
        mk.soft_presence(**full)
    with pytest.raises(exc, match=match):  # the C++ operator checks on its own
        torch.ops.mtseg.soft_presence_forward(
            full["input"], full["mode"], full["activation"], full["temperature"], 0.5, full["valid_mask"]
        )


def test_opcheck():
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    mask = make_mask((2, 3, 6, 5))
    for mode in MODES:
        xm = x.detach() if mode in HARD_MODES else x  # no gradient: the backward raises
        torch.library.opcheck(torch.ops.mtseg.soft_presence_forward, (xm, mode, "softmax", 0.2, 0.5, mask))
        torch.library.opcheck(torch.ops.mtseg.soft_presence, (x.detach(), mode, "sigmoid", 0.2, 0.5, None))
    _, stats = torch.ops.mtseg.soft_presence_forward(x.detach(), "noisy_or", "softmax", 0.2, 0.5, mask)
    torch.library.opcheck(
        torch.ops.mtseg.soft_presence_backward, (torch.randn(2, 3), x.detach(), stats, "noisy_or", "softmax", 0.2, mask)
    )
    labels = torch.randint(0, 4, (2, 5, 5))
    torch.library.opcheck(torch.ops.mtseg.class_counts, (labels, 4, -100))
    torch.library.opcheck(torch.ops.mtseg.presence_from_labels, (labels, 4, -100, 2))
    torch.library.opcheck(torch.ops.mtseg.sync_loss, (x, torch.randn(2, 3, requires_grad=True), "max", "both"))


def test_compile_training_step_fullgraph():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    head = torch.nn.Linear(1, 4)

    def step(image, labels):
        seg = conv(image)
        cls = head(image.mean(dim=(2, 3)))
        target = mk.presence_from_labels(labels, 4)
        loss = torch.nn.functional.cross_entropy(seg, labels)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(cls, target)
        return loss + mk.sync_loss(seg, cls, "smooth_max", "both") + mk.soft_presence(seg, "noisy_or").mean()

    image, labels = torch.randn(2, 1, 16, 16), torch.randint(0, 4, (2, 16, 16))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(image, labels)
    grads = torch.autograd.grad(loss, list(conv.parameters()) + list(head.parameters()))
    eager = step(image, labels)
    want = torch.autograd.grad(eager, list(conv.parameters()) + list(head.parameters()))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------
# Triton launchers (the CUDA implementation), in the interpreter on a CPU machine
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_forward_and_backward_match_reference(activation, mode, dtype):
    tp = triton_presence()
    shape = (2, 5, 30, 70)  # K_BLOCK 8 x BLOCK 512: several chunks, a ragged last one
    x = make_input(shape, activation, dtype, seed=13)
    mask = make_mask(shape, 13)
    presence, stats = tp.soft_presence_forward(x, mode, activation, 0.2, 0.5, mask)
    want = ref.soft_presence(x, mode, activation, 0.2, 0.5, mask)
    assert presence.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(presence.double(), want, atol=TOL[dtype], rtol=0)
    if mode in HARD_MODES:
        return
    g = torch.randn(shape[:2], dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad = tp.soft_presence_backward(g, x, stats, mode, activation, 0.2, mask)
    xr = x.double().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(ref.soft_presence(xr, mode, activation, 0.2, 0.5, mask), xr, g.double())
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-4)


def test_triton_3d_k40_and_extremes():
    tp = triton_presence()
    x = make_input((1, 40, 4, 5, 6), "softmax", torch.float32, seed=2)
    for mode in MODES:
        p, _ = tp.soft_presence_forward(x, mode, "softmax", 0.2, 0.5, None)
        torch.testing.assert_close(p.double(), ref.soft_presence(x, mode, temperature=0.2), atol=2e-6, rtol=0)
    big = torch.full((1, 2, 64), -1e4)
    big[0, 0] = 1e4
    for mode in MODES:
        p, stats = tp.soft_presence_forward(big, mode, "softmax", 0.1, 0.5, None)
        assert torch.isfinite(p).all() and p.tolist() == [[1.0, 0.0]]
    empty = torch.zeros(1, 64, dtype=torch.bool)
    for mode in MODES:
        p, _ = tp.soft_presence_forward(big, mode, "softmax", 0.1, 0.5, empty)
        assert p.tolist() == [[0.0, 0.0]]


def test_triton_class_counts():
    tp = triton_presence()
    labels = torch.randint(0, 70, (3, 33, 41), generator=torch.Generator().manual_seed(0))
    labels[0, :3] = 255
    assert torch.equal(tp.class_counts(labels, 70, 255), ref.class_counts(labels, 70, 255))
    labels[2, 5, 5] = 80
    with pytest.raises(ValueError, match="image 2 holds the label 80"):
        tp.class_counts(labels, 70, 255)


# --------------------------------------------------------------------------------------
# argmax: TDSNet's hard presence (a class is present when the arg-max map contains it),
# against numpy's arg-max (mtseg_kernels.reference.presence.argmax_presence)
# --------------------------------------------------------------------------------------
def test_argmax_differs_from_the_threshold_rule_on_a_hand_built_case():
    # class 1 wins the middle voxel with p = 0.4 (< 0.5): present for argmax, absent for
    # hard; class 2 never wins anywhere.
    probs = torch.tensor([[[0.8, 0.35, 0.1], [0.1, 0.4, 0.1], [0.1, 0.25, 0.8]]])  # (1, K=3, 3 voxels)
    logits = probs.log()
    assert mk.soft_presence(logits, "argmax").tolist() == [[1.0, 1.0, 1.0]]
    assert mk.soft_presence(logits, "hard", threshold=0.5).tolist() == [[1.0, 0.0, 1.0]]
    probs2 = torch.tensor([[[0.8, 0.3], [0.1, 0.4], [0.1, 0.3]]])  # class 2 ties class 0 at voxel 1: class 0 wins
    assert mk.soft_presence(probs2, "argmax", "none").tolist() == [[1.0, 1.0, 0.0]]
    mask = torch.tensor([[True, False]])
    assert mk.soft_presence(probs2, "argmax", "none", valid_mask=mask).tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_argmax_matches_numpy_with_ties_and_masks(dtype, activation):
    g = torch.Generator().manual_seed(21)
    x = torch.randint(-2, 3, (6, 5, 7, 9), generator=g).to(dtype)  # small integers: many ties
    mask = make_mask(x.shape, 21, p=0.3)
    got = mk.soft_presence(x, "argmax", activation, valid_mask=mask)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got.double(), ref.argmax_presence(x, mask))
    assert torch.equal(mk.soft_presence(x, "argmax", activation).double(), ref.argmax_presence(x))
    if dtype in (torch.float32, torch.float64):
        tgot, _ = triton_presence().soft_presence_forward(x, "argmax", activation, 0.1, 0.5, mask)
        assert torch.equal(tgot.double(), ref.argmax_presence(x, mask))


def test_argmax_nan_counts_as_the_largest_value_as_in_torch():
    x = torch.zeros(1, 3, 4)
    x[0, 1, :] = 1.0
    x[0, 2, 3] = float("nan")
    x[0, 0, 3] = float("nan")  # the first NaN class wins
    x[0, 2, 2] = float("nan")  # a NaN beats the larger finite value of class 1
    assert torch.equal(torch.argmax(x, 1)[0], torch.tensor([1, 1, 2, 0]))
    assert mk.soft_presence(x, "argmax").tolist() == [[1.0, 1.0, 1.0]]
    assert torch.equal(mk.soft_presence(x, "argmax").double(), ref.argmax_presence(x))
    assert mk.soft_presence(x[..., :2], "argmax").tolist() == [[0.0, 1.0, 0.0]]
    tp = triton_presence()
    for activation in ACTIVATIONS:
        assert tp.soft_presence_forward(x, "argmax", activation, 0.1, 0.5, None)[0].tolist() == [[1.0, 1.0, 1.0]]


def test_sync_loss_argmax_is_bce_against_the_argmax_map():
    g = torch.Generator().manual_seed(5)
    seg = (torch.randn(3, 4, 6, 6, generator=g) * 3).requires_grad_(True)
    seg.data[1, 2] -= 20  # class 2 never wins in image 1
    cls = torch.randn(3, 4, generator=g, requires_grad=True)
    mask = make_mask(seg.shape, 5)
    target = ref.argmax_presence(seg, mask).float()
    assert target[1, 2] == 0 and target.sum() > 0
    loss = mk.sync_loss(seg, cls, "argmax", weight=[1.0, 2.0, 0.5, 1.0], valid_mask=mask)
    want = torch.nn.functional.binary_cross_entropy_with_logits(cls, target, weight=torch.tensor([[1.0, 2.0, 0.5, 1.0]]))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert seg.grad is None and cls.grad is not None
    with pytest.raises(ValueError, match="mode='argmax' has no gradient"):
        mk.sync_loss(seg, cls, "argmax", "both")
    with pytest.raises(ValueError, match="mode='argmax' has no gradient"):
        torch.ops.mtseg.sync_loss(seg, cls, "argmax", "class_to_seg")


# --------------------------------------------------------------------------------------
# Fixes from the GPU and reliability reviews, each with its reproducer
# --------------------------------------------------------------------------------------
def test_max_of_negative_inputs_without_activation_is_the_maximum():
    # activation 'none' takes the input as it is: the maximum of -3 and -5 is -3 (it used to
    # be 0 below -1 on the CPU and 0 for every negative value on CUDA).
    x = torch.tensor([[[-3.0, -5.0, -4.0], [-0.5, -0.25, -2.0]]], dtype=torch.float64)
    want = torch.tensor([[-3.0, -0.25]], dtype=torch.float64)
    assert torch.equal(mk.soft_presence(x, "max", "none"), want)
    torch.testing.assert_close(ref.soft_presence(x, "max", "none"), want, atol=0, rtol=0)
    _, stats = torch.ops.mtseg.soft_presence_forward(x, "max", "none", 0.1, 0.5, None)
    assert stats[0, :, 0].tolist() == [0.0, 1.0]
    tp = triton_presence()
    p, tstats = tp.soft_presence_forward(x, "max", "none", 0.1, 0.5, None)
    assert torch.equal(p, want) and torch.equal(tstats, stats)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mk.soft_presence(xg, "max", "none").sum(), xg)
    assert grad.tolist() == [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smooth_max_with_a_tiny_temperature_is_the_max(temperature, dtype):
    # 1 / T overflows float32 below ~3e-39 and float64 at 1e-300 * 1e-9; p = m then gave
    # 0 * inf = NaN for every class.
    x = make_input((2, 3, 5, 7), "softmax", dtype, seed=4)
    want = ref.soft_presence(x, "max")
    got = mk.soft_presence(x, "smooth_max", temperature=temperature)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=0)
    tp = triton_presence()
    tgot, stats = tp.soft_presence_forward(x, "smooth_max", "softmax", temperature, 0.5, None)
    torch.testing.assert_close(tgot.double(), want, atol=TOL[dtype], rtol=0)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mk.soft_presence(xg, "smooth_max", temperature=temperature).sum(), xg)
    (want_grad,) = torch.autograd.grad(mk.soft_presence(xg, "max").sum(), xg)  # the gradient of the max
    torch.testing.assert_close(grad, want_grad, atol=TOL[dtype], rtol=0)
    tgrad = tp.soft_presence_backward(torch.ones(2, 3, dtype=dtype), x, stats, "smooth_max", "softmax", temperature,
                                      None)
    torch.testing.assert_close(tgrad, want_grad, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "index, match",
    [(1e6, r"\[-1, 16\)"), (16.0, r"\[-1, 16\)"), (-2.0, r"\[-1, 16\)"), (0.5, "integer"), (float("nan"), "integer")],
)
def test_raw_max_backward_rejects_stats_that_are_not_voxel_indices(index, match):
    # Issue reproducer: stats[..., 0] = 1e6 on a (1, 2, 4, 4) input read far out of bounds.
    x = torch.randn(1, 2, 4, 4)
    st = torch.zeros(1, 2, 2, dtype=torch.float64)
    st[..., 0] = index
    st[..., 1] = 0.5
    with pytest.raises(ValueError, match=match):
        torch.ops.mtseg.soft_presence_backward(torch.ones(1, 2), x, st, "max", "softmax", 0.1, None)
    # the CUDA launcher cannot raise without synchronising: it never indexes with them
    # and marks the gradient NaN
    tp = triton_presence()
    out = tp.soft_presence_backward(torch.ones(1, 2), x, st, "max", "softmax", 0.1, None)
    assert out.shape == x.shape and out.isnan().any() and not out[:, :, 1:].isnan().any()


def test_raw_max_backward_rejects_stats_of_a_larger_input():
    big = torch.randn(1, 2, 64, 64)
    big[0, 0, 60, 60] = 50.0
    _, stats = torch.ops.mtseg.soft_presence_forward(big, "max", "softmax", 0.1, 0.5, None)
    with pytest.raises(ValueError, match="arg-max voxel index"):
        torch.ops.mtseg.soft_presence_backward(torch.ones(1, 2), torch.randn(1, 2, 4, 4), stats, "max", "softmax",
                                               0.1, None)


@pytest.mark.parametrize(
    "grad, stats, exc, match",
    [
        (torch.ones(1, 3), torch.zeros(1, 2, 2, dtype=torch.float64), ValueError, r"grad of shape \(B, K\)"),
        (torch.ones(1, 2), torch.zeros(1, 2, 3, dtype=torch.float64), ValueError, "stats of shape"),
        (torch.ones(1, 2), torch.zeros(1, 2, 2), ValueError, "float64 stats"),
        (torch.ones(1, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.float64), TypeError, "floating-point grad"),
    ],
)
def test_backward_checks_grad_and_stats_in_every_implementation(grad, stats, exc, match):
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(exc, match=match):
        torch.ops.mtseg.soft_presence_backward(grad, x, stats, "noisy_or", "softmax", 0.1, None)
    with pytest.raises(exc, match=match):  # the fake kernel (torch.compile, meta tensors)
        torch.ops.mtseg.soft_presence_backward(grad.to("meta"), x.to("meta"), stats.to("meta"), "noisy_or", "softmax",
                                               0.1, None)
    with pytest.raises(exc, match=match):
        triton_presence().soft_presence_backward(grad, x, stats, "noisy_or", "softmax", 0.1, None)


def test_fake_kernels_check_like_the_real_ones():
    x = torch.randn(1, 2, 4, 4, device="meta")
    with pytest.raises(ValueError, match="mode must be one of"):
        torch.ops.mtseg.soft_presence_forward(x, "mean", "softmax", 0.1, 0.5, None)
    with pytest.raises(ValueError, match="temperature > 0"):
        torch.ops.mtseg.soft_presence_forward(x, "smooth_max", "softmax", 0.0, 0.5, None)
    with pytest.raises(ValueError, match=r"valid_mask must have shape"):
        torch.ops.mtseg.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, torch.ones(1, 4, 5, dtype=torch.bool,
                                                                                         device="meta"))
    with pytest.raises(TypeError, match="integer labels"):
        torch.ops.mtseg.class_counts(torch.zeros(2, 4, device="meta"), 3, -100)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        torch.ops.mtseg.class_counts(torch.zeros(2, 4, dtype=torch.int64, device="meta"), 0, -100)

    def f(seg):
        return mk.soft_presence(seg, "smooth_max", temperature=-1.0)

    with pytest.raises(Exception, match="temperature > 0"):  # at trace time, before any kernel runs
        torch.compile(f, backend="aot_eager", fullgraph=True)(torch.randn(1, 2, 4, 4))


def test_fake_backward_strides_equal_the_real_kernels():
    # A channels_last input: the kernels return a contiguous gradient, so must the fake.
    x = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    _, stats = torch.ops.mtseg.soft_presence_forward(x, "noisy_or", "softmax", 0.1, 0.5, None)
    real = torch.ops.mtseg.soft_presence_backward(torch.ones(2, 3), x, stats, "noisy_or", "softmax", 0.1, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fs, fg = mode.from_tensor(x), mode.from_tensor(stats), mode.from_tensor(torch.ones(2, 3))
        fake = torch.ops.mtseg.soft_presence_backward(fg, fx, fs, "noisy_or", "softmax", 0.1, None)
    assert real.is_contiguous() and fake.stride() == real.stride() and fake.dtype == real.dtype
    tgrad = triton_presence().soft_presence_backward(torch.ones(2, 3), x, stats, "noisy_or", "softmax", 0.1, None)
    assert tgrad.stride() == real.stride()


def test_sync_loss_weight_as_a_list():
    seg, cls = make_input((2, 3, 4, 4), "softmax", seed=3), torch.randn(2, 3)
    want = mk.sync_loss(seg, cls, "max", "both", weight=torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(mk.sync_loss(seg, cls, "max", "both", weight=[1.0, 2.0, 0.5]), want)
    torch.testing.assert_close(mk.SyncLoss("max", "both", weight=(1, 2, 0.5))(seg, cls), want)
    with pytest.raises(ValueError, match=r"weight of shape \(K,\) = \(3,\); got \(2,\)"):
        mk.sync_loss(seg, cls, "max", weight=[1.0, 2.0])
    with pytest.raises(TypeError, match="sequence of K numbers"):
        mk.sync_loss(seg, cls, "max", weight=["a", "b", "c"])
    with pytest.raises(TypeError, match="sequence of K numbers"):
        mk.sync_loss(seg, cls, "max", weight="abc")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_float32_noisy_or_gradient_is_accurate_where_exp_s_is_normal(activation):
    # Every class has S = sum log(1 - p) in [-80, -50]: exp(S) is a normal float32, the
    # gradient (~exp(S)) is tiny but representable. exp(S - log(1 - p)) with S rounded to
    # float32 loses up to |S| 2^-24 ~ 4e-6 relative; g exp(S) / (1 - p), both exact, ~1e-7.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2, 9, 11, generator=g, dtype=torch.float64) * 0.2
    if activation == "softmax":
        x[0, 0] += 0.2  # p0 ~ 0.6, p1 ~ 0.4: no cancellation in the softmax backward
    x = x.float()
    # closed form in float64 (torch's expm1 backward, grad * (expm1(S) + 1), rounds exp(S)
    # below 1e-16 to 0, so the autograd reference cannot serve here):
    # dP_k/dp_kx = exp(S_k) / (1 - p_kx), then through the activation.
    x64 = x.double()
    p = torch.softmax(x64, 1) if activation == "softmax" else torch.sigmoid(x64)
    S = torch.log1p(-p).flatten(2).sum(2)
    assert (S > -80).all() and (S < -50).all(), S
    assert (S - S.float().double()).abs().max() > 1e-6  # float32 rounding of S would show
    G = torch.exp(S)[:, :, None, None] / (1 - p)
    if activation == "softmax":
        want = p * (G - (p * G).sum(1, keepdim=True))
    else:
        want = G * p * (1 - p)
    xa = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(mk.soft_presence(xa, "noisy_or", activation), xa, torch.ones(1, 2))
    assert want.abs().min() > 1e-36
    torch.testing.assert_close(got.double(), want, atol=0, rtol=1e-6)
    tp = triton_presence()
    _, stats = tp.soft_presence_forward(x, "noisy_or", activation, 0.1, 0.5, None)
    tgot = tp.soft_presence_backward(torch.ones(1, 2), x, stats, "noisy_or", activation, 0.1, None)
    torch.testing.assert_close(tgot.double(), want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saturated_noisy_or_has_exactly_zero_gradient(activation):
    # S ~ -300 in every class: the exact gradient, at most exp(S), is 0 in float32; the
    # kernels skip the work for such images (image 0) and must still agree elsewhere.
    x = make_input((2, 3, 40, 60), activation, torch.float32, seed=6)
    if activation == "none":
        x = x * 0.5 + 0.3
    # image 1: not saturated (some class has only small probabilities)
    if activation == "softmax":
        x[1, 0] += 10.0
    elif activation == "sigmoid":
        x[1] = x[1] * 0.01 - 10.0
    else:
        x[1] = x[1] * 0.001
    mask = torch.ones(2, 40, 60, dtype=torch.bool)
    mask[1, :5] = False
    g = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 1.0]])
    xr = x.double().requires_grad_(True)
    presence = ref.soft_presence(xr, "noisy_or", activation, valid_mask=mask)
    S = torch.log1p(-ref.probabilities(x, activation)).flatten(2).sum(2)
    assert (S[0] < -250).all() and S[1].max() > -80, S
    (want,) = torch.autograd.grad(presence, xr, g.double())
    assert want[0].abs().max() == 0 and want[1].abs().max() > 0
    xa = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(mk.soft_presence(xa, "noisy_or", activation, valid_mask=mask), xa, g)
    assert got[0].abs().max() == 0
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=1e-4)
    tp = triton_presence()
    _, stats = tp.soft_presence_forward(x, "noisy_or", activation, 0.1, 0.5, mask)
    tgot = tp.soft_presence_backward(g, x, stats, "noisy_or", activation, 0.1, mask)
    assert tgot[0].abs().max() == 0
    torch.testing.assert_close(tgot.double(), want, atol=1e-7, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Triton launchers: label checks without a host sync, device guard, no triton
# --------------------------------------------------------------------------------------
def test_triton_class_counts_uint8_with_a_negative_ignore_index_and_many_classes():
    # uint8 labels with ignore_index = -100 and K > 156: the padding lanes of the last block
    # were loaded as uint8(-100) = 156 and counted as class 156.
    tp = triton_presence()
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 200, (2, 37, 29), generator=g).to(torch.uint8)  # 1073 voxels: a ragged block
    got = tp.class_counts(labels, 200, -100)
    assert torch.equal(got, ref.class_counts(labels, 200, -100))
    assert torch.equal(got, mk.class_counts(labels, 200, -100))


def test_triton_label_check_is_reported_when_the_kernel_has_finished():
    # On CUDA a launch returns before the kernel ends; the check of its labels is raised by
    # a later call (or check_label_errors) once its copy is done. Simulated here with a
    # pending check whose 'done' flips like a CUDA event's query().
    tp = triton_presence()
    labels = torch.zeros(2, 3, 4, dtype=torch.int64)
    labels[1, 2, 1] = 9
    finished = {"done": False, "waited": 0}

    def wait():
        finished["waited"] += 1
        finished["done"] = True

    first_bad = torch.tensor([12, 9])
    check = tp._LabelCheck(lambda: finished["done"], wait, first_bad, labels, 5, 255)
    tp._pending.append(check)
    try:
        tp.check_label_errors(wait=False)  # not finished yet: nothing to report
        assert check in tp._pending
        good = torch.ones(1, 4, dtype=torch.int64)
        assert tp.class_counts(good, 5, 255).tolist() == [[0, 4, 0, 0, 0]]  # still pending: no error
        with pytest.raises(ValueError, match=r"image 1 holds the label 9 \(at flat voxel index 9\).*\[0, 5\)"):
            mk.ops.presence.check_label_errors(wait=True)
        assert finished["waited"] == 1 and check not in tp._pending
    finally:
        if check in tp._pending:
            tp._pending.remove(check)


def test_triton_launchers_guard_the_inputs_device(monkeypatch):
    # Every launch runs under a guard of its input's device (inputs on cuda:1 while
    # cuda:0 is current); _device_guard gives torch.cuda.device(index) for CUDA tensors.
    tp = triton_presence()

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = tp._device_guard(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = tp._device_guard
    monkeypatch.setattr(tp, "_device_guard", lambda t: seen.append(t) or real(t))
    x = make_input((1, 2, 3, 4), "softmax")
    _, stats = tp.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    tp.soft_presence_backward(torch.ones(1, 2), x, stats, "max", "softmax", 0.1, None)
    _, stats = tp.soft_presence_forward(x, "noisy_or", "softmax", 0.1, 0.5, None)
    tp.soft_presence_backward(torch.ones(1, 2), x, stats, "noisy_or", "softmax", 0.1, None)
    tp.class_counts(torch.zeros(1, 3, dtype=torch.int64), 2, -100)
    assert len(seen) == 5 and all(t is x for t in seen[:4])


def test_triton_max_backward_adds_classes_that_share_a_voxel_in_order():
    # sigmoid and 'none': classes 0 and 2 have their maximum at the same voxel; each adds
    # its own term there (no scatter_add race on CUDA: one program per image, classes in order).
    tp = triton_presence()
    for activation in ("sigmoid", "none"):
        x = torch.full((2, 3, 5), 0.1, dtype=torch.float64)
        x[:, 0, 2] = x[:, 2, 2] = 0.9
        x[:, 1, 4] = 0.8
        g = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], dtype=torch.float64)
        _, stats = torch.ops.mtseg.soft_presence_forward(x, "max", activation, 0.1, 0.5, None)
        assert stats[..., 0].tolist() == [[2.0, 4.0, 2.0]] * 2
        want = torch.ops.mtseg.soft_presence_backward(g, x, stats, "max", activation, 0.1, None)
        got = tp.soft_presence_backward(g, x, stats, "max", activation, 0.1, None)
        torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    # softmax: every class's term lands on all K logits of its voxel
    x = torch.zeros(1, 3, 4, dtype=torch.float64)
    x[0, :, 1] = torch.tensor([2.0, 1.9, -1.0])
    x[0, 2, 3] = 0.5
    _, stats = torch.ops.mtseg.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    g = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    want = torch.ops.mtseg.soft_presence_backward(g, x, stats, "max", "softmax", 0.1, None)
    torch.testing.assert_close(tp.soft_presence_backward(g, x, stats, "max", "softmax", 0.1, None), want,
                               atol=1e-15, rtol=0)
    xr = x.clone().requires_grad_(True)
    (oracle,) = torch.autograd.grad(torch.softmax(xr, 1).flatten(2).amax(2), xr, g)
    torch.testing.assert_close(want, oracle, atol=1e-15, rtol=0)


NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # as if triton were not installed: `import triton` raises ImportError
import torch, mtseg_kernels
from mtseg_kernels import triton as pkg
assert not pkg.HAS_TRITON
for op in ("class_counts", "soft_presence_forward", "soft_presence_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mtseg::" + op, "CUDA"), op
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
try:
    torch.ops.mtseg.soft_presence_forward.default.redispatch(cuda, torch.randn(1, 2, 3), "max", "softmax", 0.1, 0.5, None)
except RuntimeError as exc:
    print("RAISED", exc)
x = torch.randn(1, 2, 3)
print("CPU", mtseg_kernels.soft_presence(x, "max").shape)
"""


def test_without_triton_cuda_presence_fails_clearly_and_cpu_works():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "RAISED mtseg::soft_presence_forward on CUDA tensors runs Triton kernels" in out.stdout
    assert "'triton' package is not installed" in out.stdout and "no automatic fallback" in out.stdout
    assert "CPU torch.Size([1, 2])" in out.stdout


def test_no_import_cycle_between_ops_and_triton():
    # ops.presence (API, registration) -> triton.presence (kernels) -> ops.presence_checks
    # (a leaf): the kernels module must not import the API module back.
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import mtseg_kernels.triton

    source = Path(mtseg_kernels.triton.__file__).with_name("presence.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module}
    assert "ops.presence" not in imported and "ops" not in imported, imported
    checks = Path(mtseg_kernels.triton.__file__).parents[1] / "ops" / "presence_checks.py"
    leaf = {node.module for node in ast.walk(ast.parse(checks.read_text())) if isinstance(node, ast.ImportFrom)}
    assert leaf <= {"__future__", "torch"}, leaf
    # importing the kernels module first works (no partially initialised module)
    out = subprocess.run([sys.executable, "-c", "import mtseg_kernels.triton.presence as t; print(t.MODES['argmax'])"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr


@pytest.mark.parametrize("programs", [4096, 3, 1])  # runs of one chunk (merged by the merge kernel) or of many
def test_triton_max_takes_the_first_of_exact_ties_across_chunks_and_runs(monkeypatch, programs):
    tp = triton_presence()
    monkeypatch.setattr(tp, "TARGET_PROGRAMS", programs)
    # equal maxima in different chunks (512 voxels each) and, at the default layout, in runs
    # that the merge kernel takes in different steps (32 runs per step)
    x = torch.full((1, 2, 20000), -5.0, dtype=torch.float64)
    x[0, 0, [1500, 2900, 19999]] = 5.0
    x[0, 1, [700, 17000]] = 3.0
    p, stats = tp.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    assert stats[0, :, 0].tolist() == [1500.0, 700.0]
    cpu_p, cpu_stats = torch.ops.mtseg.soft_presence_forward(x, "max", "softmax", 0.1, 0.5, None)
    assert torch.equal(stats, cpu_stats)
    torch.testing.assert_close(p, cpu_p, atol=1e-15, rtol=0)
    for mode in ("noisy_or", "smooth_max", "hard", "argmax"):  # the run layout changes no result
        got, st = tp.soft_presence_forward(x, mode, "softmax", 0.1, 0.5, None)
        torch.testing.assert_close(got, ref.soft_presence(x, mode, temperature=0.1), atol=1e-12, rtol=0)
