"""Every loss against a closed-form value computed independently: by hand (small cases whose
probabilities are exact fractions) and by plain-numpy loops over images, classes and pixels.
No expected value here is produced by ``losses.*`` or by torch's loss functions.

Also: the TDSNet method's sync and scene terms (valid mask honoured) against numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtseg_harness.methods import create_method, losses
from mtseg_harness.models import ModelOutput

IGNORE = 255
LOG3 = math.log(3.0)


# ------------------------------------------------------------------ numpy oracles
def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of a (B, K, ...) float64 array."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy() if t.is_floating_point() else t.numpy()


def np_cross_entropy(logits, target, weight=None):
    x, y = _np(logits), _np(target)
    p = _softmax(x)
    per_image = []
    for b in range(x.shape[0]):
        num = den = 0.0
        for idx in np.ndindex(*y.shape[1:]):
            c = int(y[(b, *idx)])
            if c == IGNORE:
                continue
            w = 1.0 if weight is None else float(weight[c])
            num += -w * math.log(p[(b, c, *idx)])
            den += w
        per_image.append(num / den if den else 0.0)
    return float(np.mean(per_image))


def _overlaps(logits, target):
    """Per image and class: (sum P*G, sum P, sum G) over the valid pixels, by loops."""
    x, y = _np(logits), _np(target)
    p = _softmax(x)
    b_, k_ = x.shape[:2]
    inter, psum, gsum = np.zeros((b_, k_)), np.zeros((b_, k_)), np.zeros((b_, k_))
    for b in range(b_):
        for idx in np.ndindex(*y.shape[1:]):
            c = int(y[(b, *idx)])
            if c == IGNORE:
                continue
            for k in range(k_):
                pk = p[(b, k, *idx)]
                psum[b, k] += pk
                gsum[b, k] += c == k
                inter[b, k] += pk * (c == k)
    return inter, psum, gsum


def np_soft_dice_loss(logits, target, smooth=1.0, include_background=True):
    inter, psum, gsum = _overlaps(logits, target)
    dice = (2 * inter + smooth) / (psum + gsum + smooth)
    return 1.0 - float((dice if include_background else dice[:, 1:]).mean())


def np_soft_iou(logits, target, smooth=1.0):
    inter, psum, gsum = _overlaps(logits, target)
    return float(((inter + smooth) / (psum + gsum - inter + smooth)).mean())


def np_focal(logits, target, gamma, alpha=None):
    x, y = _np(logits), _np(target)
    p = _softmax(x)
    per_image = []
    for b in range(x.shape[0]):
        terms = []
        for idx in np.ndindex(*y.shape[1:]):
            c = int(y[(b, *idx)])
            if c == IGNORE:
                continue
            pt = p[(b, c, *idx)]
            a = 1.0 if alpha is None else float(alpha[c])
            terms.append(-a * (1 - pt) ** gamma * math.log(pt))
        per_image.append(sum(terms) / len(terms) if terms else 0.0)
    return float(np.mean(per_image))


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def np_binary_focal(logits, target, gamma, w_pos, w_neg):
    x, y = _np(logits), _np(target).astype(np.float64)
    per_image = []
    for b in range(x.shape[0]):
        terms = []
        for v, t in zip(x[b].ravel(), y[b].ravel()):
            q = _sigmoid(v)
            terms.append(-w_pos * t * (1 - q) ** gamma * math.log(q) - w_neg * (1 - t) * q**gamma * math.log(1 - q))
        per_image.append(np.mean(terms))
    return float(np.mean(per_image))


def np_bce(logits, target):
    return np_binary_focal(logits, target, 0.0, 1.0, 1.0)


# ------------------------------------------------------------------ hand-computed cases
# One image, K = 2, three pixels in a row. Logits (log 3, 0) give p = (3/4, 1/4) exactly.
#   pixel 0: label 0, p = (3/4, 1/4)
#   pixel 1: label 1, p = (1/4, 3/4)      [logits (0, log 3)]
#   pixel 2: label 255 (ignored), p = (1/4, 3/4)
HAND_LOGITS = torch.tensor([[[[LOG3, 0.0, 0.0]], [[0.0, LOG3, LOG3]]]])  # (1, 2, 1, 3)
HAND_TARGET = torch.tensor([[[0, 1, IGNORE]]])  # (1, 1, 3)


def test_cross_entropy_by_hand():
    # both valid pixels have p_true = 3/4: CE = -log(3/4); the ignored pixel counts nowhere
    torch.testing.assert_close(losses.cross_entropy(HAND_LOGITS, HAND_TARGET), torch.tensor(-math.log(0.75)))
    # class weights (1, 3): (1 * -log .75 + 3 * -log .75) / (1 + 3) = -log .75 again; with
    # pixel 0 at p_true = 1/4 instead: (1 * -log .25 + 3 * -log .75) / 4
    logits = HAND_LOGITS.clone()
    logits[0, :, 0, 0] = torch.tensor([0.0, LOG3])
    expected = (-math.log(0.25) - 3 * math.log(0.75)) / 4
    torch.testing.assert_close(losses.cross_entropy(logits, HAND_TARGET, weight=torch.tensor([1.0, 3.0])),
                               torch.tensor(expected))


def test_soft_dice_by_hand_ignores_the_ignored_pixel():
    # valid pixels only: class 0: |PG| = 3/4, |P| = 3/4 + 1/4 = 1, |G| = 1 -> (1.5 + 1) / (2 + 1)
    # class 1: the same by symmetry. Loss = 1 - 2.5 / 3 = 1/6.
    # Counting the ignored pixel would give class 0 |P| = 5/4, class 1 |P| = 7/4: a different value.
    torch.testing.assert_close(losses.soft_dice_loss(HAND_LOGITS, HAND_TARGET), torch.tensor(1 / 6))
    # smooth = 0: Dice of each class = 1.5 / 2 = 3/4
    torch.testing.assert_close(losses.soft_dice_loss(HAND_LOGITS, HAND_TARGET, smooth=0.0), torch.tensor(0.25))
    # without background: class 1 alone, the same 3/4 here
    torch.testing.assert_close(
        losses.soft_dice_loss(HAND_LOGITS, HAND_TARGET, include_background=False, smooth=0.0), torch.tensor(0.25)
    )


def test_soft_iou_by_hand_union_subtracts_the_intersection():
    # class 0: |PG| = 3/4, |P| + |G| - |PG| = 1 + 1 - 3/4 = 5/4 -> (3/4 + 1) / (5/4 + 1) = 7/9
    # (a union without "- |PG|" would give (7/4) / 3 = 7/12); class 1 the same.
    torch.testing.assert_close(losses.soft_iou(HAND_LOGITS, HAND_TARGET), torch.tensor(7 / 9))
    torch.testing.assert_close(losses.soft_iou(HAND_LOGITS, HAND_TARGET, smooth=0.0), torch.tensor(0.6))


def test_focal_by_hand():
    # p_true = 3/4 at both valid pixels: (1/4)^2 * -log(3/4) each; alpha (0.25, 0.75) weighs
    # pixel 0 (class 0) by 0.25 and pixel 1 (class 1) by 0.75, over 2 valid pixels.
    base = 0.0625 * -math.log(0.75)
    torch.testing.assert_close(losses.focal_loss(HAND_LOGITS, HAND_TARGET, gamma=2.0), torch.tensor(base))
    torch.testing.assert_close(
        losses.focal_loss(HAND_LOGITS, HAND_TARGET, gamma=2.0, alpha=torch.tensor([0.25, 0.75])),
        torch.tensor((0.25 * base + 0.75 * base) / 2),
    )
    logits = HAND_LOGITS.clone()
    logits[0, :, 0, 0] = torch.tensor([0.0, LOG3])  # pixel 0 now p_true = 1/4
    expected = (0.25 * 0.75**2 * -math.log(0.25) + 0.75 * base) / 2
    torch.testing.assert_close(losses.focal_loss(logits, HAND_TARGET, gamma=2.0, alpha=torch.tensor([0.25, 0.75])),
                               torch.tensor(expected))


def test_binary_focal_by_hand_positive_weight_is_for_positive_labels():
    # logit log 3 -> q = 3/4. A positive label: 0.8 * (1/4)^2 * -log(3/4);
    # a negative label: 0.2 * (3/4)^2 * -log(1/4). Mean over the image's two labels.
    logits = torch.tensor([[LOG3, LOG3]])
    target = torch.tensor([[1.0, 0.0]])
    pos = 0.8 * 0.0625 * -math.log(0.75)
    neg = 0.2 * 0.5625 * -math.log(0.25)
    got = losses.binary_focal_loss(logits, target, gamma=2.0, pos_weight=0.8, neg_weight=0.2)
    torch.testing.assert_close(got, torch.tensor((pos + neg) / 2))
    # swapping the weights changes the value: positive and negative are not interchangeable
    swapped = losses.binary_focal_loss(logits, target, gamma=2.0, pos_weight=0.2, neg_weight=0.8)
    assert not torch.isclose(swapped, got)
    # gamma 0 and unit weights: plain BCE = (-log 3/4 - log 1/4) / 2
    torch.testing.assert_close(losses.binary_focal_loss(logits, target, gamma=0.0),
                               torch.tensor((-math.log(0.75) - math.log(0.25)) / 2))
    torch.testing.assert_close(losses.binary_cross_entropy(logits, target),
                               torch.tensor((-math.log(0.75) - math.log(0.25)) / 2))


def test_scene_cross_entropy_by_hand():
    # two images, 2 scenes; image 0 has scene 1 with p = 3/4, image 1 is unknown (-1): adds 0,
    # and the sum is divided by the batch size 2.
    logits = torch.tensor([[0.0, LOG3], [5.0, -5.0]])
    got = losses.scene_cross_entropy(logits, torch.tensor([1, -1]))
    torch.testing.assert_close(got, torch.tensor(-math.log(0.75) / 2))


# ------------------------------------------------------------------ random cases vs numpy loops
def _random_case(seed: int, b=3, k=4, size=(5, 6), ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, *size, generator=g) * 2
    target = torch.randint(0, k, (b, *size), generator=g)
    target[torch.rand(b, *size, generator=g) < ignore_frac] = IGNORE
    target[-1] = IGNORE  # one image with no valid pixel at all
    # strong, wrong predictions at ignored pixels: a loss that counts them changes a lot
    logits = torch.where((target == IGNORE).unsqueeze(1), logits + 6 * torch.eye(k)[0].view(1, k, 1, 1), logits)
    return logits, target


@pytest.mark.parametrize("seed", [0, 1])
def test_segmentation_losses_equal_numpy_loops(seed):
    logits, target = _random_case(seed)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.cross_entropy(logits, target).item(), np_cross_entropy(logits, target), **tol)
    w = [0.5, 2.0, 1.0, 3.0]
    torch.testing.assert_close(losses.cross_entropy(logits, target, weight=torch.tensor(w)).item(),
                               np_cross_entropy(logits, target, w), **tol)
    for smooth in (1.0, 1e-3):
        torch.testing.assert_close(losses.soft_dice_loss(logits, target, smooth=smooth).item(),
                                   np_soft_dice_loss(logits, target, smooth), **tol)
        torch.testing.assert_close(losses.soft_iou(logits, target, smooth=smooth).item(),
                                   np_soft_iou(logits, target, smooth), **tol)
    torch.testing.assert_close(losses.soft_dice_loss(logits, target, include_background=False).item(),
                               np_soft_dice_loss(logits, target, include_background=False), **tol)
    for gamma, alpha in ((2.0, None), (2.0, [0.1, 0.4, 0.2, 0.3]), (0.5, [1.0, 2.0, 3.0, 4.0])):
        a = None if alpha is None else torch.tensor(alpha)
        torch.testing.assert_close(losses.focal_loss(logits, target, gamma=gamma, alpha=a).item(),
                                   np_focal(logits, target, gamma, alpha), **tol)


def test_segmentation_losses_3d_and_other_ignore_index():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 3, 4, 5), generator=g)
    target_255 = target.clone()
    target_255[:, 0] = IGNORE
    target_m1 = torch.where(target_255 == IGNORE, torch.full_like(target, -1), target)
    tol = dict(rtol=1e-5, atol=1e-6)
    # same value whether the ignored label is 255 or -1, and equal to numpy on the 255 form
    torch.testing.assert_close(losses.soft_dice_loss(logits, target_m1, ignore_index=-1).item(),
                               np_soft_dice_loss(logits, target_255), **tol)
    torch.testing.assert_close(losses.soft_iou(logits, target_m1, ignore_index=-1).item(),
                               np_soft_iou(logits, target_255), **tol)
    torch.testing.assert_close(losses.cross_entropy(logits, target_m1, ignore_index=-1).item(),
                               np_cross_entropy(logits, target_255), **tol)


def test_binary_losses_equal_numpy_loops():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 5, generator=g) * 3
    target = (torch.rand(4, 5, generator=g) < 0.4).float()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.binary_cross_entropy(logits, target).item(), np_bce(logits, target), **tol)
    for gamma, wp, wn in ((2.0, 0.8, 0.2), (2.0, 0.5, 0.5), (1.5, 0.25, 0.75)):
        torch.testing.assert_close(
            losses.binary_focal_loss(logits, target, gamma=gamma, pos_weight=wp, neg_weight=wn).item(),
            np_binary_focal(logits, target, gamma, wp, wn), **tol)


def test_binary_focal_is_finite_for_confident_logits():
    logits = torch.tensor([[80.0, -80.0]], requires_grad=True)
    loss = losses.binary_focal_loss(logits, torch.tensor([[0.0, 1.0]]), gamma=2.0, pos_weight=0.8, neg_weight=0.2)
    # each term ~ w * 1 * 80: (0.2 * 80 + 0.8 * 80) / 2 = 40
    torch.testing.assert_close(loss, torch.tensor(40.0), rtol=1e-4, atol=0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_losses_reduce_per_image_so_batch_halves_average_to_the_whole():
    logits, target = _random_case(5, b=4, ignore_frac=0.3)
    target[-1, 0, 0] = 1  # no empty image here: equal halves
    for fn in (losses.cross_entropy, losses.soft_dice_loss, losses.soft_iou, losses.focal_loss):
        whole = fn(logits, target)
        halves = (fn(logits[:2], target[:2]) + fn(logits[2:], target[2:])) / 2
        torch.testing.assert_close(whole, halves)


def test_mse():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(losses.mse(pred, target), torch.tensor((1 + 4 + 0 + 4) / 4))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: losses.cross_entropy(torch.randn(1, 2, 3, 3), torch.full((1, 3, 3), 2)), ValueError,
         r"labels must lie in \[0, 2\) or equal ignore_index=255; got \[2\]"),
        (lambda: losses.soft_dice_loss(torch.randn(1, 2, 3, 3), torch.full((1, 3, 3), -1)), ValueError,
         r"got \[-1\]"),
        (lambda: losses.soft_iou(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long)), ValueError,
         r"label map of shape \(B, \*S\) = \(1, 3, 3\)"),
        (lambda: losses.focal_loss(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3)), TypeError, "integer class ids"),
        (lambda: losses.focal_loss(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), gamma=-1.0),
         ValueError, "gamma must be >= 0"),
        (lambda: losses.focal_loss(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long),
                                   alpha=torch.ones(3)), ValueError, r"one weight per class, shape \(2,\)"),
        (lambda: losses.binary_focal_loss(torch.randn(2, 3), torch.zeros(2, 4)), ValueError, "logits' shape"),
        (lambda: losses.scene_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3])), ValueError, "must be < 3"),
        (lambda: losses.scene_cross_entropy(torch.randn(2, 3), torch.tensor([0.0, 1.0])), ValueError, "integer"),
        (lambda: losses.mse(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, "differ in shape"),
    ],
)
def test_bad_arguments_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ TDSNet's sync and scene terms
def _out(seg, **kw):
    fields = dict(seg=seg, side=(), hog=(), presence=None, scene=None, approx=None)
    fields.update(kw)
    return ModelOutput(**fields)


def test_tdsnet_sync_and_scene_terms_honour_the_valid_mask():
    """Stage 2 adds ``w_sync * BCE(class logits, presence of the segmentation)`` over the valid
    pixels only; stage 3 adds ``w_scene * scene CE``. Every pixel's winning class has
    p > 0.5 here, so the presence is the same under the arg-max and the p > 0.5 rule."""
    k = 3
    g = torch.Generator().manual_seed(7)
    winners = torch.randint(0, 2, (2, 4, 5), generator=g)  # valid pixels predict classes 0 and 1 only
    mask = torch.randint(0, 2, (2, 4, 5), generator=g)
    mask[0, :2] = IGNORE
    winners[0, :2] = 2  # class 2 is predicted only at ignored pixels of image 0
    winners[1, 0, 0] = 2  # ... and at one valid pixel of image 1
    seg = 4.0 * torch.nn.functional.one_hot(winners, k).movedim(-1, 1).float()  # p(winner) = e^4 / (e^4 + 2)
    cls = torch.tensor([[1.5, -0.5, 2.0], [-1.0, 0.25, 0.75]])
    scene_logits = torch.tensor([[0.2, -0.3], [1.0, 0.0]])
    m = create_method("tdsnet", k, num_scenes=2, w_cls=0.5, w_sync=0.25, w_scene=2.0)
    batch = m.targets({"mask": mask, "scene": torch.tensor([1, -1])})
    out = _out(seg, presence=cls, scene=scene_logits)
    l1, _ = m.loss(out, batch, 0, 9)
    l2, logs2 = m.loss(out, batch, 4, 9)
    l3, logs3 = m.loss(out, batch, 8, 9)

    # numpy: hard presence of the segmentation over valid pixels only
    w, msk = winners.numpy(), mask.numpy()
    q = np.array([[float(((w[b] == c) & (msk[b] != IGNORE)).any()) for c in range(k)] for b in range(2)])
    assert q.tolist() == [[1, 1, 0], [1, 1, 1]]  # image 0: class 2 only at ignored pixels -> absent
    sync = np_bce(cls, torch.from_numpy(q))
    torch.testing.assert_close((l2 - l1).item(), 0.25 * sync, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs2["sync"], sync, rtol=1e-5, atol=1e-6)
    # scene: image 0 has scene 1, image 1 is unknown; divided by the batch size
    p = _softmax(_np(scene_logits))
    scene = -math.log(p[0, 1]) / 2
    torch.testing.assert_close((l3 - l2).item(), 2.0 * scene, rtol=1e-5, atol=1e-6)

    # stage 1 in full: CE + (1 - soft IoU) + w_cls * BCE(class logits, label presence)
    presence = np.array([[float(((msk[b] == c)).any()) for c in range(k)] for b in range(2)])
    expected = np_cross_entropy(seg, mask) + 1 - np_soft_iou(seg, mask) + 0.5 * np_bce(cls, torch.from_numpy(presence))
    torch.testing.assert_close(l1.item(), expected, rtol=1e-5, atol=1e-6)
