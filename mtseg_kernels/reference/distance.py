"""scipy/numpy oracles of the distance operators (``mtseg_kernels.ops.distance``).

Slow and plain: one image at a time with ``scipy.ndimage``. Used by the tests and the
benchmarks; never by the operators themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi


def edt_reference(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt`` per image of ``(B, *spatial)``, +inf where an image has no zero."""
    out = np.empty(mask.shape, dtype=np.float64)
    for i, m in enumerate(mask != 0):
        out[i] = np.inf if m.all() else ndi.distance_transform_edt(m, sampling=spacing)
    return out


def signed_edt_reference(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """``d(x, foreground)`` outside minus ``d(x, background)`` inside, per image."""
    m = mask != 0
    return edt_reference(~m, spacing) - edt_reference(m, spacing)


def levelset_grow_reference(
    approx: np.ndarray, seg: np.ndarray, lam: float, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """``{phi <= 0}``, ``phi = d(x, A) - lam * d(x, complement(S))``, per image, in float64.

    ``d(x, A) = 0`` on A; an empty A grows nothing; ``lam = 0`` returns A.
    """
    out = np.zeros(approx.shape, dtype=bool)
    for i, (a, s) in enumerate(zip(approx != 0, seg != 0)):
        if not a.any():
            continue
        if lam == 0:
            out[i] = a
            continue
        d_a = ndi.distance_transform_edt(~a, sampling=spacing)
        d_s = np.full(s.shape, np.inf) if s.all() else ndi.distance_transform_edt(s, sampling=spacing)
        with np.errstate(invalid="ignore"):
            phi = d_a - lam * d_s
        out[i] = a | (phi <= 0)
    return out


def surface_voxels(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """``mask XOR binary_erosion(mask)`` with ``generate_binary_structure(ndim, connectivity)``
    (voxels on the image border count as surface: scipy's ``border_value=0``)."""
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndi.binary_erosion(mask, structure=structure)


def surface_metrics_reference(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
    connectivity: int = 1,
) -> tuple[float, float, float]:
    """(Hausdorff, percentile Hausdorff, ASSD) of two binary masks of one image (MONAI's definitions).

    Both empty -> nan; exactly one empty -> inf.
    """
    p, t = pred != 0, target != 0
    if not p.any() and not t.any():
        return (np.nan, np.nan, np.nan)
    if not p.any() or not t.any():
        return (np.inf, np.inf, np.inf)
    sp, st = surface_voxels(p, connectivity), surface_voxels(t, connectivity)
    d_pt = ndi.distance_transform_edt(~st, sampling=spacing)[sp]
    d_tp = ndi.distance_transform_edt(~sp, sampling=spacing)[st]
    hd = max(d_pt.max(), d_tp.max())
    hdp = max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile))
    assd = np.concatenate([d_pt, d_tp]).mean()
    return (float(hd), float(hdp), float(assd))
