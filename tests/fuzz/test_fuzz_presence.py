"""Raw-op fuzzers of the presence ops: class_counts, presence_from_labels, soft_presence,
soft_presence_forward / _backward and sync_loss.

Oracles: numpy counting for the label ops; the float64 plain-PyTorch reference
(``mtseg_kernels/reference/presence.py``) and autograd through it for the others.
``soft_presence_backward`` is also fed ``stats`` that do not belong to its input (from
another input, random, hostile, wrong shape, dtype or device): it must not crash.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fuzzing import (
    ALL_DTYPES,
    FLOAT_DTYPES,
    call,
    floats_at_limits,
    fuzz_settings,
    ints_at_limits,
    mostly,
    shapes,
    tensors,
    to_numpy,
)
from hypothesis import given
from hypothesis import strategies as st

from mtseg_kernels.reference import presence as ref

MODES = ("max", "noisy_or", "smooth_max", "hard", "argmax")
SOFT_MODES = ("max", "noisy_or", "smooth_max")
ACTIVATIONS = ("softmax", "sigmoid", "none")
INT_LABELS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------
@st.composite
def label_args(draw):
    shape = draw(mostly(shapes(2, 4, max_side=5, min_side=1), shapes(1, 5, max_side=3), 0.15))
    dtypes = draw(mostly(st.just(INT_LABELS), st.just(ALL_DTYPES), 0.15))
    labels = draw(tensors(shape=shape, dtypes=dtypes, low=-1, high=6, kinds=("small", "small", "hostile")))
    num_classes = draw(mostly(st.integers(1, 8), ints_at_limits(), 0.15))
    ignore = draw(mostly(st.sampled_from([-100, -1, 255, 5]), ints_at_limits(), 0.15))
    return labels, num_classes, ignore


def expected_counts(labels, num_classes, ignore):
    """numpy counts, or None where some kept label lies outside [0, num_classes)."""
    x = to_numpy(labels).astype(object).reshape(labels.shape[0], -1)  # exact for every int dtype
    kept = x != ignore
    if (kept & ((x < 0) | (x >= num_classes))).any():
        return None
    return np.stack([((x == k) & kept).sum(1) for k in range(num_classes)], axis=1).astype(np.int64)


def check_label_result(out, labels, num_classes, ignore):
    assert 2 <= labels.dim() <= 4 and labels.shape[0] > 0 and num_classes >= 1
    assert not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    want = expected_counts(labels, num_classes, ignore)
    assert want is not None, "accepted a label outside [0, num_classes) that is not ignore_index"
    assert out.shape == (labels.shape[0], num_classes)
    return want


@fuzz_settings
@given(label_args())
def test_class_counts(args):
    out = call("class_counts", *args)
    if out is not None:
        want = check_label_result(out, *args)
        assert out.dtype == torch.int64
        np.testing.assert_array_equal(out.numpy(), want)


@fuzz_settings
@given(label_args(), mostly(st.integers(1, 4), ints_at_limits(), 0.2))
def test_presence_from_labels(args, min_count):
    out = call("presence_from_labels", *args, min_count)
    if out is not None:
        want = check_label_result(out, *args)
        assert min_count >= 1
        np.testing.assert_array_equal(to_numpy(out).astype(np.float64), (want >= min_count).astype(np.float64))


# --------------------------------------------------------------------------------------
# Soft presence
# --------------------------------------------------------------------------------------
@st.composite
def valid_masks(draw, input_shape):
    """None, a bool (B, *spatial) mask, or a wrong one (shape, dtype, device)."""
    kind = draw(st.sampled_from(["none", "none", "good", "good", "wrong_shape", "wrong_dtype", "meta"]))
    spatial = (input_shape[0], *input_shape[2:]) if len(input_shape) >= 2 else input_shape
    if kind == "none":
        return None
    if kind == "wrong_shape":
        return draw(tensors(shape=draw(shapes(0, 5, max_side=3)), dtypes=[torch.bool]))
    if kind == "wrong_dtype":
        return draw(tensors(shape=spatial, dtypes=[torch.uint8, torch.int64, torch.float32]))
    mask = draw(tensors(shape=spatial, dtypes=[torch.bool]))
    return mask.to("meta") if kind == "meta" else mask


@st.composite
def presence_inputs(draw):
    shape = draw(mostly(shapes(3, 5, max_side=4, min_side=1), shapes(1, 5, max_side=3), 0.15))
    activation = draw(mostly(st.sampled_from(ACTIVATIONS), st.sampled_from(["", "Softmax", "relu"]), 0.1))
    dtypes = draw(mostly(st.just(FLOAT_DTYPES), st.just(ALL_DTYPES), 0.1))
    x = draw(tensors(shape=shape, dtypes=dtypes, kinds=("small", "small", "hostile")))
    if activation == "none" and x.is_floating_point() and draw(st.integers(0, 4)):
        x = torch.sigmoid(x.double()).to(x.dtype)  # probabilities, as activation='none' takes
    return x, activation


def temperatures():
    return mostly(st.sampled_from([0.1, 0.5, 1.0, 0.01]), floats_at_limits(), 0.2)


@st.composite
def soft_presence_args(draw):
    x, activation = draw(presence_inputs())
    mode = draw(mostly(st.sampled_from(MODES), st.sampled_from(["", "MAX", "mean"]), 0.1))
    threshold = draw(mostly(st.sampled_from([0.5, 0.3, 0.9]), floats_at_limits(), 0.15))
    return x, mode, activation, draw(temperatures()), threshold, draw(valid_masks(tuple(x.shape)))


def oracle_ok(x, activation, mode, threshold, valid_mask) -> bool:
    """Inputs the float64 reference speaks for exactly: finite (probabilities for 'none'),
    a hard threshold not within rounding of any probability."""
    if valid_mask is not None and valid_mask.device.type == "meta":
        return False
    xd = x.double()
    if not bool(torch.isfinite(xd).all()):
        return False
    if activation == "none" and not bool(((xd >= 0) & (xd <= 1)).all()):
        return False
    if mode == "hard":
        p = ref.probabilities(xd, activation)
        if bool(((p - threshold).abs() < 1e-5).any()):
            return False
    return True


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


def check_presence(out, x, mode, activation, temperature, threshold, valid_mask):
    assert 3 <= x.dim() <= 5 and x.is_floating_point() and x.shape[0] > 0 and x.shape[1] > 0
    assert mode in MODES and activation in ACTIVATIONS
    assert out.shape == x.shape[:2] and out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if mode in SOFT_MODES or mode == "hard":
        pass
    if not oracle_ok(x, activation, mode, threshold, valid_mask):
        return
    if mode == "smooth_max" and not (np.isfinite(temperature) and temperature > 0):
        raise AssertionError(f"accepted temperature {temperature}")
    want = ref.soft_presence(x, mode, activation, temperature, threshold, valid_mask)
    np.testing.assert_allclose(out.double().numpy(), want.numpy(), rtol=tolerance(x.dtype), atol=tolerance(x.dtype),
                               err_msg=f"soft_presence {mode} {activation}")


@fuzz_settings
@given(soft_presence_args())
def test_soft_presence(args):
    out = call("soft_presence", *args)
    if out is not None:
        check_presence(out, *args)


@fuzz_settings
@given(soft_presence_args())
def test_soft_presence_forward(args):
    res = call("soft_presence_forward", *args)
    if res is not None:
        presence, stats = res
        check_presence(presence, *args)
        assert stats.shape == (*args[0].shape[:2], 2) and stats.dtype == torch.float64


@st.composite
def backward_args(draw):
    x, mode, activation, temperature, threshold, valid_mask = draw(soft_presence_args())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    bk = tuple(x.shape[:2]) if x.dim() >= 2 else (1, 1)
    stats_kind = draw(st.sampled_from(["own", "own", "own", "other_input", "random", "hostile", "wrong", "meta"]))
    stats = None
    if stats_kind in ("own", "meta") and x.is_floating_point():
        res = call("soft_presence_forward", x, mode, activation, temperature, threshold, valid_mask, meta=False)
        stats = None if res is None else res[1]
        if stats is not None and stats_kind == "meta":
            stats = stats.to("meta")
    elif stats_kind == "other_input":
        # Stats of a larger input with the same (B, K): the out-of-bounds reproducer.
        big = torch.randn((*bk, 16, 16), generator=gen, dtype=torch.float64) * 3
        res = call("soft_presence_forward", big, draw(st.sampled_from(SOFT_MODES)), "softmax", 0.1, 0.5, None,
                   meta=False)
        stats = None if res is None else res[1]
    elif stats_kind == "random":
        stats = torch.rand((*bk, 2), generator=gen, dtype=torch.float64) * 10 ** draw(st.integers(-3, 7))
    elif stats_kind == "hostile":
        stats = draw(tensors(shape=(*bk, 2), dtypes=[torch.float64], kinds=("hostile",)))
    if stats is None:  # 'wrong', or no stats came out of the forward
        stats = draw(tensors(shape=draw(shapes(0, 4, max_side=3)), dtypes=ALL_DTYPES))
    grad = draw(mostly(tensors(shape=bk, dtypes=FLOAT_DTYPES, kinds=("small",)),
                       tensors(shape=draw(shapes(0, 3, max_side=3)), dtypes=ALL_DTYPES), 0.15))
    return grad, x, stats, mode, activation, temperature, valid_mask, stats_kind


@fuzz_settings
@given(backward_args())
def test_soft_presence_backward(args):
    grad, x, stats, mode, activation, temperature, valid_mask, stats_kind = args
    out = call("soft_presence_backward", grad, x, stats, mode, activation, temperature, valid_mask)
    if out is None:
        return
    assert mode in SOFT_MODES and activation in ACTIVATIONS and x.is_floating_point()
    assert grad.shape == x.shape[:2] and grad.is_floating_point(), "accepted a grad of the wrong shape or dtype"
    assert stats.shape == (*x.shape[:2], 2) and stats.dtype == torch.float64, "accepted stats of the wrong shape"
    assert out.shape == x.shape and out.dtype == x.dtype
    if stats_kind != "own" or not oracle_ok(x, activation, mode, 0.5, valid_mask) or not bool(grad.isfinite().all()):
        return
    if mode == "max" and x.unique().numel() != x.numel():
        return  # a tie: the maximum's gradient may go to either voxel
    xd = x.detach().double().requires_grad_(True)
    presence = ref.soft_presence(xd, mode, activation, temperature, 0.5, valid_mask)
    (want,) = torch.autograd.grad((presence * grad.double()).sum(), xd, allow_unused=True)
    want = torch.zeros_like(xd) if want is None else want
    scale = max(1.0, float(want.abs().max()) if want.numel() else 1.0)
    err = (out.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= 1e3 * tolerance(x.dtype) * scale, f"soft_presence_backward {mode} {activation}: error {err:.3g}"


# --------------------------------------------------------------------------------------
# Sync loss
# --------------------------------------------------------------------------------------
@st.composite
def sync_args(draw):
    x, activation = draw(presence_inputs())
    B, K = (tuple(x.shape[:2]) + (1, 1))[:2]
    class_logits = draw(mostly(tensors(shape=(B, K), dtypes=FLOAT_DTYPES, layouts=("contiguous", "transposed")),
                               tensors(shape=draw(shapes(0, 3, max_side=3))), 0.15))
    mode = draw(mostly(st.sampled_from(MODES), st.sampled_from(["", "soft"]), 0.1))
    direction = draw(mostly(st.sampled_from(["seg_to_class", "class_to_seg", "both"]), st.just("sideways"), 0.1))
    reduction = draw(mostly(st.sampled_from(["mean", "sum", "none"]), st.just("max"), 0.1))
    weight_kind = draw(st.sampled_from(["none", "none", "good", "wrong", "meta"]))
    weight = None
    if weight_kind in ("good", "meta"):
        weight = draw(tensors(shape=(K,), dtypes=FLOAT_DTYPES, kinds=("small",))).abs()
        weight = weight.to("meta") if weight_kind == "meta" else weight
    elif weight_kind == "wrong":
        weight = draw(tensors(shape=draw(shapes(0, 2, max_side=4))))
    threshold = draw(mostly(st.just(0.5), floats_at_limits(), 0.15))
    return (x, class_logits, mode, direction, reduction, weight, activation, draw(temperatures()), threshold,
            draw(valid_masks(tuple(x.shape))))


@fuzz_settings
@given(sync_args())
def test_sync_loss(args):
    x, class_logits, mode, direction, reduction, weight, activation, temperature, threshold, valid_mask = args
    out = call("sync_loss", *args)
    if out is None:
        return
    assert x.is_floating_point() and 3 <= x.dim() <= 5 and mode in MODES and activation in ACTIVATIONS
    assert class_logits.shape == x.shape[:2] and class_logits.is_floating_point()
    assert weight is None or (weight.shape == (x.shape[1],) and weight.device == x.device)
    assert reduction in ("mean", "sum", "none") and direction in ("seg_to_class", "class_to_seg", "both")
    assert out.shape == (x.shape[:2] if reduction == "none" else ())
    if not (oracle_ok(x, activation, mode, threshold, valid_mask) and bool(class_logits.isfinite().all())):
        return
    if weight is not None and not bool(weight.isfinite().all()):
        return
    want = ref.sync_loss(x, class_logits, mode, direction, reduction, weight, activation, temperature, threshold,
                         valid_mask)
    tol = 1e3 * tolerance(torch.float64 if x.dtype == class_logits.dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(out.double().detach().numpy(), want.detach().numpy(), rtol=tol, atol=tol,
                               err_msg=f"sync_loss {mode} {direction} {reduction}")


def test_sync_loss_reports_bad_seg_logits_as_its_own():
    """Bad seg_logits used to surface as soft_presence's error ("soft_presence: expected at
    least one image ..."), naming neither the op called nor the argument."""
    cls = torch.zeros(2, 3)
    cases = [
        (torch.zeros(2, 3, 0, 4), ValueError, "at least one voxel in seg_logits"),
        (torch.zeros(0, 3, 4, 4), ValueError, "at least one image and one class in seg_logits"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.bool), TypeError, "as seg_logits; got Bool"),
        (torch.zeros(2, 3, 1, 1, 1, 1), ValueError, "expected seg_logits of shape"),
    ]
    for device in ("cpu", "meta"):
        for seg, error, match in cases:
            c = cls[: seg.shape[0]] if seg.shape[0] == 0 else cls
            with pytest.raises(error, match=rf"^sync_loss: .*{match}"):
                torch.ops.mtseg.sync_loss(seg.to(device), c.to(device), "max", "seg_to_class", "mean", None, "softmax",
                                          0.1, 0.5, None)


def test_presence_from_labels_reports_bad_labels_as_its_own():
    """Bad labels used to surface as class_counts' error ("class_counts: expected at least
    one image"), naming an op the caller never called."""
    cases = [
        (torch.zeros(0, 4, dtype=torch.uint8), 2, ValueError, "expected at least one image"),
        (torch.zeros(2, 4), 2, TypeError, "expected integer labels"),
        (torch.zeros(2, 4, dtype=torch.int64), 0, ValueError, "num_classes must be >= 1"),
        (torch.zeros(2, dtype=torch.int64), 2, ValueError, "expected labels of shape"),
    ]
    for device in ("cpu", "meta"):
        for labels, k, error, match in cases:
            with pytest.raises(error, match=rf"^presence_from_labels: {match}"):
                torch.ops.mtseg.presence_from_labels(labels.to(device), k, -100, 1)
