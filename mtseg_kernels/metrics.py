"""Surface metrics of segmentations: Hausdorff distance (max and a percentile, e.g. HD95)
and average symmetric surface distance (ASSD), batched, per class, in physical units.

Built on the exact distance transform ``torch.ops.mtseg.edt`` (CPU and CUDA). The values
are MONAI's (``compute_hausdorff_distance``, ``compute_average_surface_distance`` with
``symmetric=True``; the tests compare against MONAI itself); the conventions that differ
are listed under *Differences from MONAI* below.

Input formats (``format=``):

* ``"mask"``: binary masks ``(B, H, W)`` or ``(B, D, H, W)``; one value per image, ``(B,)``.
  bool or integer masks: non-zero is foreground. Float masks must hold only 0 and 1.
* ``"labels"``: integer label maps ``(B, H, W)`` or ``(B, D, H, W)`` with ``num_classes``;
  class ``c`` is the mask ``labels == c``. Every label must lie in ``0..num_classes-1``.
  Result ``(B, K)``.
* ``"onehot"``: one binary mask per channel, ``(B, C, H, W)`` or ``(B, C, D, H, W)``
  (MONAI's layout, e.g. the output of ``AsDiscrete(to_onehot=C)``; channels may overlap,
  as BraTS regions do). Values must be 0 or 1. Result ``(B, K)``.
* ``"auto"`` (default) accepts only what one format can mean: 5-d input -> ``"onehot"``;
  ``num_classes`` given -> ``"labels"``; 3-d input -> ``"mask"``. 4-d input without
  ``num_classes`` is ``(B, D, H, W)`` masks or ``(B, C, H, W)`` one-hot, so it needs
  ``format=`` or a ``spacing`` whose length tells the number of spatial axes; so does a
  4-d input with ``num_classes`` equal to its second size. Masks under ``"auto"`` must
  hold only 0 and 1 (a label map without ``num_classes`` is an error, not a silent
  foreground-vs-background merge).

With ``"labels"`` and ``"onehot"``, ``include_background=False`` (the default, as MONAI)
leaves out class / channel 0, so ``K = num_classes - 1`` (or ``C - 1``); with ``True``,
``K = num_classes`` (or ``C``).

``spacing``: a number (isotropic), one value per spatial axis, or ``(B, ndim)`` (or
``(B, 1)``) per image, as MONAI accepts; default 1.

Definitions:

* surface of a mask: ``mask AND NOT erosion(mask)``, the erosion with the structure
  ``scipy.ndimage.generate_binary_structure(ndim, connectivity)`` (``connectivity=1``:
  faces, MONAI's) and the outside of the image as background, so mask voxels on the
  image border are surface voxels;
* ``d_pt``: for every surface voxel of ``pred``, the Euclidean distance (with
  ``spacing``) to the nearest surface voxel of ``target``; ``d_tp`` the other way;
* Hausdorff = ``max(max d_pt, max d_tp)``; percentile Hausdorff =
  ``max(percentile(d_pt, q), percentile(d_tp, q))`` with linear interpolation
  (``numpy.percentile``'s and ``torch.quantile``'s default); ASSD =
  ``mean(concat(d_pt, d_tp))``.

Differences from MONAI (1.6):

* empty masks: both empty -> ``nan`` for all three (MONAI: nan too); exactly one empty ->
  ``+inf`` for all three (MONAI: inf for HD and ASSD, but **nan for the percentile HD**);
* ``reduction="mean"`` (and the other means) of no valid value gives ``nan`` (MONAI: 0);
* results are float64 (MONAI: float32), so they agree with MONAI to float32 rounding;
* MONAI reads a non-bool mask as ``mask == 1``; here bool/integer masks of
  ``format="mask"`` mean non-zero, and every other non-binary input is rejected;
* ASSD is symmetric; MONAI's ``compute_average_surface_distance`` defaults to
  ``symmetric=False`` (pred to target only): pass ``symmetric=True`` there to compare;
* ``connectivity`` (MONAI: always faces), label-map input and per-image spacing groups
  are extras; MONAI's ``directed``, ``ignore_index`` and non-Euclidean metrics are absent
  (set ignored voxels to a class, e.g. background, in both maps first).

Nothing here is differentiable: results carry no gradient history.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .ops.distance import _INTEGER_DTYPES, _MASK_DTYPES, _check_spacing

__all__ = [
    "SurfaceDistance",
    "SurfaceDistanceMetric",
    "SurfaceMetrics",
    "average_surface_distance",
    "hausdorff_distance",
    "surface_metrics",
]

FORMATS = ("auto", "mask", "labels", "onehot")
REDUCTIONS = ("none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel")


class SurfaceMetrics(NamedTuple):
    """Hausdorff distance, percentile Hausdorff distance and ASSD, in physical units."""

    hausdorff: Tensor
    hausdorff_percentile: Tensor
    assd: Tensor


# --------------------------------------------------------------------------------------
# Input checks: every format becomes a batch of bool masks (N, *spatial)
# --------------------------------------------------------------------------------------
def _check_tensor(op: str, name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _MASK_DTYPES:
        raise TypeError(f"{op}: {name} must be bool, an integer or a floating dtype, got {x.dtype}")


def _spacing_width(spacing) -> int | None:
    """Values per row of a spacing argument (None for a number, None, or only isotropic rows)."""
    if spacing is None or isinstance(spacing, (int, float)):
        return None
    try:
        t = torch.as_tensor(spacing)
    except (TypeError, ValueError, RuntimeError):  # ragged per-image rows
        try:
            widths = {torch.as_tensor(row).numel() for row in spacing} - {1}
        except (TypeError, ValueError, RuntimeError):
            return None
        return widths.pop() if len(widths) == 1 else None
    if t.dim() == 1:
        return t.numel()
    if t.dim() == 2 and t.shape[1] > 1:
        return t.shape[1]
    return None


def _resolve_format(op: str, x: Tensor, fmt: str, num_classes, spacing) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{op}: format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    width = _spacing_width(spacing)
    if x.dim() == 5:
        return "onehot"
    if num_classes is not None:
        if x.dim() == 4 and x.shape[1] == num_classes and width != 3:
            if width == 2:
                return "onehot"
            raise ValueError(
                f"{op}: a 4-d input of shape {tuple(x.shape)} with num_classes={num_classes} is ambiguous: "
                "(B, D, H, W) label maps whose depth equals num_classes, or (B, C, H, W) one-hot? "
                "Pass format='labels' or format='onehot' (or a spacing with one value per spatial axis)"
            )
        return "labels"
    if x.dim() == 3:
        return "mask"
    if x.dim() == 4:
        if width in (2, 3):
            return "mask" if width == 3 else "onehot"
        raise ValueError(
            f"{op}: a 4-d input of shape {tuple(x.shape)} is ambiguous: (B, D, H, W) 3D masks or "
            "(B, C, H, W) one-hot 2D masks? Pass format='mask' or format='onehot' (or label maps "
            "with num_classes, or a spacing with one value per spatial axis)"
        )
    raise ValueError(
        f"{op}: expected (B, H, W) or (B, D, H, W) masks or label maps, or (B, C, H, W) or "
        f"(B, C, D, H, W) one-hot masks, got shape {tuple(x.shape)} (add a batch axis with x[None])"
    )


def _check_binary(op: str, name: str, x: Tensor, nonzero_is_foreground: bool) -> Tensor:
    """``x != 0`` after checking that ``x`` holds a binary mask (see the module docstring)."""
    if x.dtype == torch.bool:
        return x
    if x.dtype.is_floating_point and torch.isnan(x).any():
        raise ValueError(f"{op}: {name} contains NaN; masks must hold only 0 and 1")
    if x.dtype.is_floating_point or not nonzero_is_foreground:
        other = (x != 0) & (x != 1)
        if other.any():
            value = x[other][0].item()
            hint = (
                "threshold probabilities first (e.g. pred > 0.5), or pass argmax label maps with num_classes"
                if x.dtype.is_floating_point
                else "pass label maps with num_classes=..., or format='mask' to read non-zero as foreground"
            )
            raise ValueError(f"{op}: {name} must hold only 0 and 1 (a binarized mask), found {value}: {hint}")
    return x != 0


def _check_labels(op: str, name: str, x: Tensor, num_classes: int) -> Tensor:
    """``x`` as int64 after checking that every label lies in ``0..num_classes-1``."""
    if x.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"{op}: label maps (format='labels', or num_classes given) must be integer tensors, got {x.dtype} "
            f"for {name}; bool or 0/1 masks: format='mask'; one-hot (B, C, ...): format='onehot'"
        )
    wide = x.to(torch.int64)  # uint64 values >= 2**63 wrap to negatives: caught below
    if wide.numel():
        low, high = torch.aminmax(wide)
        if low < 0 or high >= num_classes:
            bad = (wide < 0) | (wide >= num_classes)
            value = wide[bad]
            value = int(value.max()) if (value >= num_classes).any() else int(value.min())
            if x.dtype == torch.uint64 and value < 0:
                value += 2**64
            raise ValueError(
                f"{op}: {name} holds label {value}, outside 0..{num_classes - 1} (num_classes={num_classes}); "
                "map ignored or extra labels to a class first (e.g. torch.where(target == 255, 0, target)) "
                "or raise num_classes"
            )
    return wide


def _check_int(op: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    return value


def _as_masks(
    op: str, pred: Tensor, target: Tensor, fmt: str, num_classes, include_background: bool, spacing
) -> tuple[Tensor, Tensor, int, int | None]:
    """Checks the inputs and turns them into bool masks ``(N, *spatial)``.

    Returns ``(pred_masks, target_masks, batch, K)``: ``N = batch * K`` image-major, and
    ``K = None`` for ``format="mask"`` (one value per image).
    """
    _check_tensor(op, "pred", pred)
    _check_tensor(op, "target", target)
    if pred.shape != target.shape:
        raise ValueError(
            f"{op}: pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"{op}: pred and target must be on the same device, got {pred.device} and {target.device}")
    explicit = fmt != "auto"
    fmt = _resolve_format(op, pred, fmt, num_classes, spacing)
    first = 0 if include_background else 1
    if fmt == "onehot":
        if pred.dim() not in (4, 5):
            raise ValueError(
                f"{op}: format='onehot' expects (B, C, H, W) or (B, C, D, H, W), got shape {tuple(pred.shape)}"
            )
        channels = pred.shape[1]
        if channels == 0:
            raise ValueError(
                f"{op}: every spatial axis and the channel axis must be non-empty, got shape {tuple(pred.shape)}"
            )
        if num_classes is not None and _check_int(op, "num_classes", num_classes, 1) != channels:
            raise ValueError(f"{op}: num_classes={num_classes} but the one-hot input has {channels} channels")
        if channels - first < 1:
            raise ValueError(
                f"{op}: one-hot input with {channels} channel(s) and include_background=False leaves no class "
                "(channel 0 is background): pass include_background=True, or format='mask' for (B, *spatial) masks"
            )
    else:
        if pred.dim() not in (3, 4):
            raise ValueError(
                f"{op}: format={fmt!r} expects (B, H, W) or (B, D, H, W), got shape {tuple(pred.shape)} "
                "(add a batch axis with x[None])"
            )
        if fmt == "labels":
            if num_classes is None:
                raise ValueError(f"{op}: format='labels' needs num_classes")
            _check_int(op, "num_classes", num_classes, 1)
            if num_classes - first < 1:
                raise ValueError(
                    f"{op}: num_classes={num_classes} with include_background=False leaves no class: "
                    "pass include_background=True"
                )
        elif num_classes is not None:
            raise ValueError(f"{op}: num_classes is for format='labels' or 'onehot', not {fmt!r}")
    spatial_shape = pred.shape[2:] if fmt == "onehot" else pred.shape[1:]
    if any(n == 0 for n in spatial_shape):
        raise ValueError(f"{op}: every spatial axis must be non-empty, got shape {tuple(pred.shape)}")
    batch = pred.shape[0]
    if fmt == "mask":
        # an explicit format='mask' reads non-zero integers as foreground; 'auto' wants 0/1
        p = _check_binary(op, "pred", pred, nonzero_is_foreground=explicit)
        t = _check_binary(op, "target", target, nonzero_is_foreground=explicit)
        return p, t, batch, None
    if fmt == "onehot":
        p = _check_binary(op, "pred", pred, nonzero_is_foreground=False)[:, first:]
        t = _check_binary(op, "target", target, nonzero_is_foreground=False)[:, first:]
        k = p.shape[1]
        return p.reshape(batch * k, *p.shape[2:]), t.reshape(batch * k, *t.shape[2:]), batch, k
    classes = torch.arange(first, num_classes, device=pred.device).view(1, -1, *([1] * (pred.dim() - 1)))
    k = num_classes - first
    p = _check_labels(op, "pred", pred, num_classes).unsqueeze(1) == classes
    t = _check_labels(op, "target", target, num_classes).unsqueeze(1) == classes
    return p.reshape(batch * k, *pred.shape[1:]), t.reshape(batch * k, *pred.shape[1:]), batch, k


def _spacing_rows(op: str, spacing, batch: int, spatial: int) -> list[float] | list[list[float]] | None:
    """One spacing for the batch (``list[float]``), one per image (``list[list[float]]``), or None.

    Per image: ``(B, ndim)`` or ``(B, 1)`` (isotropic), or a list mixing such rows, as MONAI.
    """
    if spacing is None:
        return None
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        return _check_spacing(op, spacing, spatial)
    expected = f"a number, one number per spatial axis, or (B, ndim) per image, got {spacing!r}"
    try:
        t = torch.as_tensor(spacing, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        # ragged: per-image rows of different lengths
        if not isinstance(spacing, Sequence) or isinstance(spacing, str):
            raise TypeError(f"{op}: spacing must be {expected}") from None
        rows = list(spacing)
    else:
        if t.dim() == 0:
            return _check_spacing(op, float(t), spatial)
        if t.dim() == 1:
            return _check_spacing(op, t.tolist(), spatial)
        if t.dim() != 2:
            raise ValueError(f"{op}: spacing must be {expected} (shape {tuple(t.shape)})")
        rows = t.tolist()
    if len(rows) != batch:
        raise ValueError(f"{op}: per-image spacing must have one row per image ({batch}), got {len(rows)} rows")
    out = []
    for row in rows:
        try:
            values = torch.as_tensor(row, dtype=torch.float64, device="cpu").reshape(-1).tolist()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{op}: spacing must be {expected}") from None
        out.append(_check_spacing(op, values[0] if len(values) == 1 else values, spatial))
    return out


# --------------------------------------------------------------------------------------
# The computation on bool masks (N, *spatial)
# --------------------------------------------------------------------------------------
def _surface(mask: Tensor, connectivity: int) -> Tensor:
    """``mask & ~erosion(mask)``; the structure has the neighbours with at most
    ``connectivity`` non-zero offsets; outside the image counts as background."""
    spatial = mask.dim() - 1
    padded = F.pad(mask.to(torch.uint8), (1, 1) * spatial, value=0).bool()
    eroded = mask.clone()
    size = mask.shape[1:]
    for offset in itertools.product((-1, 0, 1), repeat=spatial):
        nz = sum(o != 0 for o in offset)
        if nz == 0 or nz > connectivity:
            continue
        index = (slice(None),) + tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, size))
        eroded &= padded[index]
    return mask & ~eroded


def _row_percentile(values: Tensor, rows: Tensor, counts: Tensor, q: float) -> Tensor:
    """``numpy.percentile`` (linear interpolation) of each row's values; rows without values -> nan.

    ``values`` holds the rows' values back to back (``rows``: their row ids, ascending, as
    ``nonzero`` gives them; ``counts``: values per row), so only surface voxels are sorted.
    """
    if values.numel() == 0:
        return torch.full(counts.shape, torch.nan, dtype=torch.float64, device=counts.device)
    by_value = values.argsort(stable=True)
    by_row = rows[by_value].argsort(stable=True)  # stable: values stay ascending within a row
    ordered = values[by_value][by_row]
    start = counts.cumsum(0) - counts
    pos = (counts - 1).clamp(min=0).to(torch.float64) * (q / 100.0)
    lo, hi = pos.floor().long(), pos.ceil().long()
    last = values.numel() - 1
    v_lo = ordered[(start + lo).clamp(max=last)]
    v_hi = ordered[(start + hi).clamp(max=last)]
    out = torch.where(v_hi == v_lo, v_lo, v_lo + (v_hi - v_lo) * (pos - lo.to(torch.float64)))
    return out.where(counts > 0, torch.nan)


def _directed(to_other: Tensor, surface: Tensor, q: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Max, q-th percentile, sum and count, per row, of ``to_other`` at the ``surface`` voxels
    (rows ``(N, voxels)``)."""
    rows = surface.nonzero()[:, 0]
    values = to_other[surface]
    counts = surface.sum(1)
    n = surface.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64, device=surface.device)
    top = zeros.scatter_reduce(0, rows, values, "amax")  # distances are >= 0
    total = zeros.index_add(0, rows, values)
    return top, _row_percentile(values, rows, counts, q), total, counts


def _metrics_one_spacing(pred: Tensor, target: Tensor, spacing, percentile: float, connectivity: int) -> SurfaceMetrics:
    n = pred.shape[0]
    sp_p, sp_t = _surface(pred, connectivity), _surface(target, connectivity)
    # Distance from every voxel to the other mask's surface (+inf where it has none).
    to_t = torch.ops.mtseg.edt(~sp_t, spacing, False, False, torch.float64).reshape(n, -1)
    to_p = torch.ops.mtseg.edt(~sp_p, spacing, False, False, torch.float64).reshape(n, -1)
    max_pt, q_pt, sum_pt, n_p = _directed(to_t, sp_p.reshape(n, -1), percentile)
    max_tp, q_tp, sum_tp, n_t = _directed(to_p, sp_t.reshape(n, -1), percentile)
    hd = torch.maximum(max_pt, max_tp)
    hdp = torch.maximum(q_pt, q_tp)
    assd = (sum_pt + sum_tp) / (n_p + n_t).to(torch.float64)
    empty_p, empty_t = n_p == 0, n_t == 0
    one = empty_p ^ empty_t
    both = empty_p & empty_t
    return SurfaceMetrics(*(v.where(~one, torch.inf).where(~both, torch.nan) for v in (hd, hdp, assd)))


def _crop_to_foreground(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Both batches cut to the bounding box of all their foreground (one box for the batch).

    Exact: every surface voxel lies in the box, and what the cut removes is background,
    which is what the erosion assumes outside the image anyway.
    """
    union = (pred | target).any(0)
    if not union.any():
        return pred, target
    index = [slice(None)]
    for axis in range(union.dim()):
        hit = union.any(dim=[a for a in range(union.dim()) if a != axis]).nonzero()[:, 0]
        index.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return pred[tuple(index)], target[tuple(index)]


def _binary_surface_metrics(
    pred: Tensor, target: Tensor, spacing, percentile: float, connectivity: int
) -> SurfaceMetrics:
    """Metrics of bool masks ``(N, *spatial)``; ``spacing`` shared or one row per mask."""
    pred, target = _crop_to_foreground(pred, target)
    if spacing is None or not isinstance(spacing[0], list):
        return _metrics_one_spacing(pred, target, spacing, percentile, connectivity)
    # One distance transform per distinct spacing (a dataset has few pixel sizes).
    groups: dict[tuple[float, ...], list[int]] = {}
    for i, row in enumerate(spacing):
        groups.setdefault(tuple(row), []).append(i)
    out = [torch.empty(pred.shape[0], dtype=torch.float64, device=pred.device) for _ in range(3)]
    for row, members in groups.items():
        index = torch.tensor(members, device=pred.device)
        part = _metrics_one_spacing(pred[index], target[index], list(row), percentile, connectivity)
        for o, v in zip(out, part):
            o[index] = v
    return SurfaceMetrics(*out)


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------
def surface_metrics(
    pred: Tensor,
    target: Tensor,
    spacing: float | Sequence[float] | Sequence[Sequence[float]] | Tensor | None = None,
    percentile: float = 95.0,
    connectivity: int = 1,
    num_classes: int | None = None,
    include_background: bool = False,
    format: str = "auto",
) -> SurfaceMetrics:
    """Hausdorff distance (max and a percentile) and average symmetric surface distance.

    Formats, definitions and the differences from MONAI: see :mod:`mtseg_kernels.metrics`.

    Args:
        pred, target: same shape and device. ``format="mask"``: ``(B, *spatial)`` binary
            masks; ``"labels"``: ``(B, *spatial)`` integer label maps in
            ``0..num_classes-1``; ``"onehot"``: ``(B, C, *spatial)`` 0/1 masks per channel;
            ``"auto"``: inferred where only one format fits. ``*spatial`` is ``(H, W)`` or
            ``(D, H, W)``; dtypes bool, (u)int8..64, float16/bfloat16/32/64 (floats hold
            only 0 and 1; NaN is rejected).
        spacing: voxel size: a number, one per spatial axis, or ``(B, ndim)`` per image.
        percentile: in [0, 100], default 95 (HD95).
        connectivity: 1..ndim, the erosion structure (1 = faces, MONAI's).
        num_classes: number of classes of label maps (selects ``"labels"`` under ``"auto"``).
        include_background: keep class / channel 0 (labels, onehot).
        format: ``"auto"``, ``"mask"``, ``"labels"`` or ``"onehot"``.

    Returns:
        :class:`SurfaceMetrics` of float64 tensors on the input's device: ``(B,)`` for
        masks, ``(B, K)`` per class. Both masks empty: ``nan``; exactly one empty:
        ``+inf``. Not differentiable.

    Example:
        >>> p = torch.zeros(1, 8, 8, dtype=torch.bool); p[0, 2:5, 2:5] = True
        >>> surface_metrics(p, p.roll(2, dims=2)).hausdorff
        tensor([2.], dtype=torch.float64)
    """
    op = "surface_metrics"
    p, t, batch, k = _as_masks(op, pred, target, format, num_classes, bool(include_background), spacing)
    spatial = p.dim() - 1
    sp = _spacing_rows(op, spacing, batch, spatial)
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise ValueError(f"{op}: percentile must be a number in [0, 100], got {percentile!r}")
    if isinstance(connectivity, bool) or connectivity not in range(1, spatial + 1):
        raise ValueError(f"{op}: connectivity must be in 1..{spatial} for {spatial}D masks, got {connectivity!r}")
    shape = (batch,) if k is None else (batch, k)
    if batch == 0:
        empty = p.new_empty(shape, dtype=torch.float64)
        return SurfaceMetrics(empty, empty.clone(), empty.clone())
    if isinstance(sp, list) and sp and isinstance(sp[0], list) and k is not None:
        sp = [row for row in sp for _ in range(k)]  # image-major, like the masks
    out = _binary_surface_metrics(p.detach(), t.detach(), sp, float(percentile), connectivity)
    return SurfaceMetrics(*(v.view(shape) for v in out))


def hausdorff_distance(
    pred: Tensor,
    target: Tensor,
    spacing=None,
    percentile: float | None = None,
    **kwargs,
) -> Tensor:
    """Hausdorff distance (``percentile=None``) or percentile Hausdorff (e.g. 95); see :func:`surface_metrics`."""
    m = surface_metrics(pred, target, spacing, 95.0 if percentile is None else percentile, **kwargs)
    return m.hausdorff if percentile is None else m.hausdorff_percentile


def average_surface_distance(pred: Tensor, target: Tensor, spacing=None, **kwargs) -> Tensor:
    """Average symmetric surface distance (ASSD); see :func:`surface_metrics`."""
    return surface_metrics(pred, target, spacing, **kwargs).assd


class SurfaceDistance(nn.Module):
    """Module form of :func:`surface_metrics`: ``forward(pred, target, spacing=None) -> SurfaceMetrics``
    (a ``spacing`` given to ``forward`` replaces the module's, e.g. per-image ``(B, ndim)``)."""

    def __init__(self, spacing=None, percentile: float = 95.0, connectivity: int = 1, num_classes: int | None = None,
                 include_background: bool = False, format: str = "auto"):
        super().__init__()
        self.spacing, self.percentile, self.connectivity = spacing, percentile, connectivity
        self.num_classes, self.include_background, self.format = num_classes, include_background, format

    def forward(self, pred: Tensor, target: Tensor, spacing=None) -> SurfaceMetrics:
        return surface_metrics(pred, target, self.spacing if spacing is None else spacing, self.percentile,
                               self.connectivity, self.num_classes, self.include_background, self.format)

    def extra_repr(self) -> str:
        return (f"spacing={self.spacing}, percentile={self.percentile}, connectivity={self.connectivity}, "
                f"num_classes={self.num_classes}, include_background={self.include_background}, format={self.format!r}")


# --------------------------------------------------------------------------------------
# Accumulating metric (MONAI's Cumulative metrics / torchmetrics style)
# --------------------------------------------------------------------------------------
def _reduce(values: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """MONAI's ``do_metric_reduction`` over ``(N, K)`` values (nan = undefined, left out),
    except that a mean over no valid value is nan (MONAI: 0). Returns (value, count of
    the values it used)."""
    valid = ~values.isnan()
    kept = values.where(valid, 0.0)

    def mean(dim):
        n = valid.sum(dim)
        return (kept.sum(dim) / n).where(n > 0, torch.nan), n

    if reduction == "none":
        return values, valid.long()
    if reduction == "sum":
        return kept.sum(), valid.sum()
    if reduction == "mean":  # per image over its classes, then over images with a value
        per_image, n = mean(1)
        has = n > 0
        return (per_image[has].mean() if has.any() else values.new_tensor(torch.nan)), has.sum()
    dim = 0 if reduction.endswith("_batch") else 1
    if reduction.startswith("mean"):
        return mean(dim)
    return kept.sum(dim), valid.sum(dim)


def _comm_device(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(local: Tensor | None, group) -> Tensor | None:
    """Concatenation over ranks (rank order) of ``(n_r, 3[, K])`` float64 rows; ranks may
    hold different numbers of rows, or none (``None``). Collective: every rank calls it."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = _comm_device(group)
    n = 0 if local is None else local.shape[0]
    k = -1 if local is None else (0 if local.dim() == 2 else local.shape[2])
    meta = torch.tensor([n, k], dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    counts = [int(m[0]) for m in metas]
    widths = sorted({int(m[1]) for m in metas} - {-1})
    if len(widths) > 1:
        raise RuntimeError(
            f"SurfaceDistanceMetric: ranks hold different numbers of classes per image ({widths}, 0 = masks): "
            "every rank must use the same format and classes"
        )
    if not widths:
        return None
    tail = () if widths[0] == 0 else (widths[0],)
    padded = torch.full((max(max(counts), 1), 3, *tail), torch.nan, dtype=torch.float64, device=device)
    if n:
        padded[:n] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)]).cpu()


class SurfaceDistanceMetric:
    """HD, percentile HD and ASSD accumulated over batches, reduced over the whole run.

    In the style of MONAI's ``HausdorffDistanceMetric`` / torchmetrics: call it on every
    batch (it returns and keeps the per-image values), then ``aggregate()`` once, then
    ``reset()``. Under ``torch.distributed`` (any backend; ranks may see different numbers
    of batches, or none) ``get_buffer()`` and ``aggregate()`` gather every rank's values,
    so they are collective calls: every rank must make them, and every rank gets the
    result for all the data. (A ``DistributedSampler`` pads the dataset with repeated
    samples to split it evenly; those are counted twice, as in MONAI.)

    Args:
        spacing, percentile, connectivity, num_classes, include_background, format: as
            :func:`surface_metrics`; a ``spacing`` given to a call replaces this one for
            that batch (e.g. per-image ``(B, ndim)``).
        reduction: ``"mean"`` (per image over its classes, then over images, as MONAI),
            ``"sum"``, ``"mean_batch"`` / ``"sum_batch"`` (per class, over images),
            ``"mean_channel"`` / ``"sum_channel"`` (per image, over classes) or ``"none"``.
            ``nan`` values (both masks empty) are left out; ``inf`` ones are kept.
        get_not_nans: ``aggregate()`` also returns how many values each result used.
        process_group: the group to gather over (default: the whole world).

    Example:
        >>> metric = SurfaceDistanceMetric(num_classes=3)
        >>> for pred, target in batches:            # doctest: +SKIP
        ...     metric(pred, target)
        >>> metric.aggregate().hausdorff_percentile  # doctest: +SKIP
    """

    def __init__(self, spacing=None, percentile: float = 95.0, connectivity: int = 1, num_classes: int | None = None,
                 include_background: bool = False, format: str = "auto", reduction: str = "mean",
                 get_not_nans: bool = False, process_group=None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"SurfaceDistanceMetric: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if format not in FORMATS:
            raise ValueError(f"SurfaceDistanceMetric: format must be one of {FORMATS}, got {format!r}")
        self.spacing, self.percentile, self.connectivity = spacing, percentile, connectivity
        self.num_classes, self.include_background, self.format = num_classes, include_background, format
        self.reduction, self.get_not_nans, self.process_group = reduction, get_not_nans, process_group
        self._rows: list[Tensor] = []

    def __call__(self, pred: Tensor, target: Tensor, spacing=None) -> SurfaceMetrics:
        """Metrics of one batch, ``(B,)`` or ``(B, K)`` each; also kept for ``aggregate()``."""
        m = surface_metrics(pred, target, self.spacing if spacing is None else spacing, self.percentile,
                            self.connectivity, self.num_classes, self.include_background, self.format)
        rows = torch.stack(tuple(m), 1).cpu()  # (B, 3[, K])
        if self._rows and rows.shape[2:] != self._rows[0].shape[2:]:
            raise ValueError(
                f"SurfaceDistanceMetric: this batch has per-image shape {tuple(m.hausdorff.shape[1:])}, earlier "
                f"batches {tuple(self._rows[0].shape[2:])}: call reset() before changing the classes"
            )
        self._rows.append(rows)
        return m

    update = __call__

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        self._rows = []

    def _gathered(self) -> Tensor | None:
        local = torch.cat(self._rows) if self._rows else None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            return _all_gather_rows(local, self.process_group)
        return local

    def get_buffer(self) -> SurfaceMetrics:
        """Every per-image value so far (all ranks, in rank order), CPU float64 ``(N,)`` or ``(N, K)``."""
        rows = self._gathered()
        if rows is None:
            empty = torch.empty(0, dtype=torch.float64)
            return SurfaceMetrics(empty, empty.clone(), empty.clone())
        return SurfaceMetrics(*rows.unbind(1))

    def aggregate(self, reduction: str | None = None):
        """The reduced metrics (CPU float64), as a :class:`SurfaceMetrics`; with
        ``get_not_nans``, ``(values, counts)``, both :class:`SurfaceMetrics`."""
        reduction = self.reduction if reduction is None else reduction
        if reduction not in REDUCTIONS:
            raise ValueError(f"SurfaceDistanceMetric: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        rows = self._gathered()
        if rows is None:
            raise RuntimeError("SurfaceDistanceMetric.aggregate: no batch seen (on any rank) since the last reset()")
        per_class = rows.dim() == 3
        values, counts = [], []
        for m in rows.unbind(1):
            v, n = _reduce(m if per_class else m[:, None], reduction)
            if not per_class and reduction in ("none", "mean_batch", "sum_batch"):
                v, n = v.squeeze(-1), n.squeeze(-1)  # masks: no class axis
            values.append(v)
            counts.append(n)
        out = SurfaceMetrics(*values)
        return (out, SurfaceMetrics(*counts)) if self.get_not_nans else out

    def __repr__(self) -> str:
        return (f"SurfaceDistanceMetric(percentile={self.percentile}, num_classes={self.num_classes}, "
                f"format={self.format!r}, reduction={self.reduction!r}, batches={len(self._rows)})")
