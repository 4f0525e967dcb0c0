"""The float64 HOG reference (``mtseg_kernels.reference.hog``) itself: its gradient magnitude
against the exact value (``fractions``), over the whole float64 range."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mtseg_kernels.reference.hog import _magnitude, hog_cells_reference

ULPS = 4  # the scaled form rounds four times: divide, square-and-add, sqrt, multiply


def _close_to_exact(m: float, a: float, b: float) -> bool:
    """``m`` within ``ULPS`` float64 ulps (relative) of ``sqrt(a**2 + b**2)``, decided exactly."""
    if not math.isfinite(m) or m < 0:
        return False
    exact_sq = Fraction(a) ** 2 + Fraction(b) ** 2
    tol = Fraction(ULPS, 2**53)
    return (1 - tol) ** 2 * exact_sq <= Fraction(m) ** 2 <= (1 + tol) ** 2 * exact_sq


def _gradients(exponents: tuple[int, int], n: int = 400, seed: int = 0):
    """Pairs of signed float64 values with decimal exponents in ``exponents``, some equal in size, some 0."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 10, n) * 10.0 ** rng.integers(*exponents, n) * rng.choice([-1, 1], n)
    b = rng.uniform(1, 10, n) * 10.0 ** rng.integers(*exponents, n) * rng.choice([-1, 1], n)
    b[:20] = a[:20]  # |g_row| == |g_col|
    b[20:40] = 0.0
    return torch.from_numpy(a), torch.from_numpy(b)


@pytest.mark.parametrize("exponents", [(154, 308), (-5, 5), (-307, -154)], ids=["huge", "ordinary", "tiny"])
def test_magnitude_is_the_exact_hypot_to_a_few_ulps(exponents):
    a, b = _gradients(exponents)
    m = _magnitude(a, b)
    bad = [(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), m.tolist()) if not _close_to_exact(z, x, y)]
    assert not bad, f"{len(bad)} of {len(m)} off the exact value, e.g. {bad[:3]}"


def test_magnitude_at_the_ends_of_the_float64_range():
    big, sub = torch.finfo(torch.float64).max, 5e-324
    a = torch.tensor([big / 2, big, sub, 0.0, 0.0, -1e300], dtype=torch.float64)
    b = torch.tensor([big / 2, 0.0, sub, 0.0, -7.0, 1e300], dtype=torch.float64)
    m = _magnitude(a, b)
    for x, y, z in zip(a.tolist()[:3] + a.tolist()[4:], b.tolist()[:3] + b.tolist()[4:], m.tolist()[:3] + m.tolist()[4:]):
        if x == sub:  # sqrt(2) * the smallest subnormal rounds to it
            assert z == sub
        else:
            assert _close_to_exact(z, x, y), (x, y, z)
    assert m[3] == 0
    inf = _magnitude(torch.tensor([math.inf, 1.0], dtype=torch.float64), torch.tensor([1.0, -math.inf], dtype=torch.float64))
    assert torch.isinf(inf).all() and (inf > 0).all()


def test_magnitude_gradient_is_g_over_its_norm_and_zero_at_zero():
    a, b = _gradients((154, 308), n=60, seed=1)
    a, b = torch.cat([a, torch.zeros(1, dtype=a.dtype)]), torch.cat([b, torch.zeros(1, dtype=b.dtype)])
    a.requires_grad_(True)
    b.requires_grad_(True)
    _magnitude(a, b).sum().backward()
    for x, y, gx, gy in zip(a.tolist(), b.tolist(), a.grad.tolist(), b.grad.tolist()):
        if x == 0 and y == 0:
            assert (gx, gy) == (0.0, 0.0)
            continue
        norm = math.hypot(x, y)
        assert gx == pytest.approx(x / norm, rel=1e-14, abs=1e-300) and gy == pytest.approx(y / norm, rel=1e-14, abs=1e-300)


def test_hog_cells_of_an_image_scaled_by_a_power_of_two_scale_exactly():
    """Gradients, magnitudes and votes scale by 2**k exactly, the bins not at all: the cells of
    ``2**k * x`` are ``2**k`` times the cells of ``x``, bit for bit, up to 1e300 (they were inf)."""
    x = torch.from_numpy(np.random.default_rng(2).random((2, 1, 16, 24)))
    cells = hog_cells_reference(x, 9, (8, 8))
    for k in (500, 900, -900):
        s = math.ldexp(1.0, k)
        assert torch.equal(hog_cells_reference(x * s, 9, (8, 8)), cells * s), k
