"""Exact Euclidean distance transforms, connected components, level-set growth and
surface metrics, batched, as PyTorch operators (DESIGN.md section 3.3).

Masks are batched: ``(B, H, W)`` (2D) or ``(B, D, H, W)`` (3D); any dtype, non-zero
means foreground (NaN is rejected). ``spacing`` is the physical size of a voxel per
spatial axis (``(sy, sx)`` or ``(sz, sy, sx)``), default 1. An unbatched 2D mask needs
``mask[None]``; a single 3D volume ``volume[None]``.

Operators (``torch.ops.mtseg``):

* ``edt(mask, spacing=None, squared=False, signed=False, dtype=None)`` -> ``(B, *spatial)``
  float32 (float64 on request): distance from every non-zero voxel to the nearest zero
  voxel, exactly as ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)``;
  zero voxels get 0. An image **without any zero voxel gives +inf** everywhere (scipy
  returns meaningless finite numbers there). ``signed=True``: ``+d(x, foreground)``
  outside the mask, ``-d(x, background)`` inside; both are distances between voxel
  centres, so no voxel is 0 (no half-voxel shift); an empty mask gives +inf everywhere,
  a full one -inf.
* ``connected_components(mask, connectivity)`` -> ``(labels, counts)``: int32 labels
  ``(B, *spatial)``, 0 for background and ``1..n`` in raster order of first appearance
  per image (what ``scipy.ndimage.label`` numbers), and the int64 counts ``(B,)``.
  Connectivity 4 or 8 (2D), 6, 18 or 26 (3D).
* ``levelset_grow(approx, seg, lam, spacing=None)`` -> bool ``(B, *spatial)``:
  ``{x : d(x, A) - lam * d(x, complement(S)) <= 0}`` (Ke et al.), with ``d(x, A) = 0`` on A.
* ``grow_instances(seeds, seg, lam, spacing=None, connectivity=0)`` -> int64 instance map.

The exact algorithm (Felzenszwalb & Huttenlocher's lower envelope of parabolas, one axis
at a time, in ``csrc/include/mtseg/distance.h``) is shared by the CPU and CUDA kernels.

None of these operators is differentiable (distances of a thresholded mask have zero
gradient almost everywhere; use them as labels and metrics): the wrappers detach their
inputs, so outputs carry no gradient history, and a backward through the raw
``torch.ops.mtseg.edt`` / ``levelset_grow`` raises instead of returning zeros.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "EDT",
    "GrownInstances",
    "LevelSetGrow",
    "SurfaceDistance",
    "SurfaceMetrics",
    "average_surface_distance",
    "connected_components",
    "edt",
    "grow_instances",
    "hausdorff_distance",
    "levelset_grow",
    "signed_edt",
    "surface_metrics",
]

_MASK_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}


# --------------------------------------------------------------------------------------
# Argument checks (the C++ operators check again, for direct torch.ops callers)
# --------------------------------------------------------------------------------------
def _check_mask(op: str, name: str, mask: Tensor) -> int:
    """Validates a batched mask and returns its number of spatial axes (2 or 3)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{op}: {name} must be bool, an integer or a floating dtype, got {mask.dtype}")
    if mask.dim() not in (3, 4):
        raise ValueError(
            f"{op}: {name} must be batched, (B, H, W) or (B, D, H, W), got shape {tuple(mask.shape)} "
            "(add a batch axis with mask[None])"
        )
    return mask.dim() - 1


def _check_spacing(op: str, spacing: float | Sequence[float] | None, spatial: int) -> list[float] | None:
    if spacing is None:
        return None
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = [float(spacing)] * spatial
    if isinstance(spacing, Tensor):
        spacing = spacing.tolist()
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: spacing must be a number or a sequence of numbers, got {spacing!r}") from None
    if len(values) != spatial:
        raise ValueError(f"{op}: spacing must have one value per spatial axis ({spatial}), got {len(values)}: {values}")
    if not all(v > 0 and v != float("inf") for v in values):
        raise ValueError(f"{op}: spacing must be positive and finite, got {values}")
    return values


def _check_pair(op: str, a: Tensor, b: Tensor, name_a: str, name_b: str) -> int:
    spatial = _check_mask(op, name_a, a)
    _check_mask(op, name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: {name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    return spatial


def _check_lam(op: str, lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"{op}: lam must be a number, got {lam!r}")
    if not (0 <= lam < float("inf")):
        raise ValueError(f"{op}: lam must be finite and >= 0, got {lam}")
    return float(lam)


def _check_connectivity(op: str, connectivity: int | None, spatial: int) -> int:
    if connectivity is None:
        return _CONNECTIVITY[spatial][0]
    if connectivity not in _CONNECTIVITY[spatial]:
        raise ValueError(
            f"{op}: connectivity for {spatial}D masks must be one of {_CONNECTIVITY[spatial]}, got {connectivity}"
        )
    return int(connectivity)


# --------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, so torch.compile can trace the ops
# --------------------------------------------------------------------------------------
@torch.library.register_fake("mtseg::edt")
def _edt_fake(mask, spacing=None, squared=False, signed=False, dtype=None):
    torch._check(mask.dim() in (3, 4), lambda: f"edt: expected (B, H, W) or (B, D, H, W), got {mask.dim()}-d")
    return mask.new_empty(mask.shape, dtype=dtype if dtype is not None else torch.float32)


@torch.library.register_fake("mtseg::connected_components")
def _connected_components_fake(mask, connectivity):
    return mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty((mask.shape[0],), dtype=torch.int64)


@torch.library.register_fake("mtseg::levelset_grow")
def _levelset_grow_fake(approx, seg, lam, spacing=None):
    return approx.new_empty(approx.shape, dtype=torch.bool)


@torch.library.register_fake("mtseg::grow_instances")
def _grow_instances_fake(seeds, seg, lam, spacing=None, connectivity=0):
    return seeds.new_empty(seeds.shape, dtype=torch.int64)


# --------------------------------------------------------------------------------------
# Not differentiable: a backward that says so (instead of a silent zero gradient)
# --------------------------------------------------------------------------------------
def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"mtseg::{name} is not differentiable (distances of a thresholded mask have no useful "
            "gradient); detach its inputs or use its output as a label"
        )

    return backward


for _name in ("edt", "levelset_grow"):
    torch.library.register_autograd(f"mtseg::{_name}", _not_differentiable(_name))


# --------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------
def edt(
    mask: Tensor,
    spacing: float | Sequence[float] | None = None,
    squared: bool = False,
    signed: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Exact Euclidean distance transform of a batch of masks (scipy semantics).

    Args:
        mask: ``(B, H, W)`` or ``(B, D, H, W)``, any dtype (non-zero = foreground), any
            strides, CPU or CUDA.
        spacing: voxel size per spatial axis (a number means isotropic); default 1.
        squared: return squared distances (no square root).
        signed: ``-d(x, background)`` inside the mask, ``+d(x, foreground)`` outside.
        dtype: ``torch.float32`` (default) or ``torch.float64``.

    Returns:
        ``(B, *spatial)`` distances: 0 on zero voxels, the distance to the nearest zero
        voxel elsewhere; ``+inf`` for an image without any zero voxel. Not differentiable.

    Example:
        >>> m = torch.zeros(1, 5, 5, dtype=torch.bool); m[0, 1:4, 1:4] = True
        >>> edt(m)[0, 2, 2].item()
        2.0
    """
    spatial = _check_mask("edt", "mask", mask)
    sp = _check_spacing("edt", spacing, spatial)
    if dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"edt: dtype must be torch.float32 or torch.float64, got {dtype}")
    return torch.ops.mtseg.edt(mask.detach(), sp, bool(squared), bool(signed), dtype)


def signed_edt(mask: Tensor, spacing: float | Sequence[float] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Signed distance ``d(x, foreground) - d(x, background)``: negative inside, positive outside.

    Same as ``edt(mask, spacing, signed=True)``; see :func:`edt`.
    """
    return edt(mask, spacing, signed=True, dtype=dtype)


def connected_components(mask: Tensor, connectivity: int | None = None) -> tuple[Tensor, Tensor]:
    """Connected components of a batch of masks, numbered per image.

    Args:
        mask: ``(B, H, W)`` or ``(B, D, H, W)`` (non-zero = foreground), CPU or CUDA.
        connectivity: 4 or 8 in 2D, 6, 18 or 26 in 3D; default: faces only (4 / 6),
            as ``scipy.ndimage.label``.

    Returns:
        ``(labels, counts)``: int32 labels of the mask's shape (0 = background, ``1..n``
        in raster order of each component's first voxel) and int64 counts ``(B,)``.
    """
    spatial = _check_mask("connected_components", "mask", mask)
    conn = _check_connectivity("connected_components", connectivity, spatial)
    return torch.ops.mtseg.connected_components(mask, conn)


def levelset_grow(
    approx: Tensor, seg: Tensor, lam: float, spacing: float | Sequence[float] | None = None
) -> Tensor:
    """One level-set label update of the recursive-approximation method (Ke et al.).

    ``A_next = {x : phi(x) <= 0}`` with ``phi(x) = d(x, A) - lam * d(x, complement(S))``,
    where ``d(x, A)`` is the Euclidean distance from x to the nearest voxel of A (0 on A)
    and ``d(x, complement(S))`` that to the nearest voxel outside S (0 outside S).
    So the result contains A, lies in ``A | S``, grows with ``lam``, is A for
    ``lam = 0`` and ``A | S`` for large ``lam``; an empty A stays empty.

    Args:
        approx: approximation masks A ``(B, *spatial)`` (non-zero = inside).
        seg: predicted segmentation S of the same shape.
        lam: growth speed, >= 0.
        spacing: voxel size per spatial axis.

    Returns:
        bool ``(B, *spatial)``. Not differentiable.
    """
    spatial = _check_pair("levelset_grow", approx, seg, "approx", "seg")
    lam = _check_lam("levelset_grow", lam)
    sp = _check_spacing("levelset_grow", spacing, spatial)
    return torch.ops.mtseg.levelset_grow(approx.detach(), seg.detach(), lam, sp)


class GrownInstances(NamedTuple):
    """Result of :func:`grow_instances`: the instance map and the class map (both int64)."""

    instances: Tensor
    classes: Tensor


def grow_instances(
    seeds: Tensor,
    seg: Tensor,
    lam: float,
    spacing: float | Sequence[float] | None = None,
    connectivity: int | None = None,
    seed_classes: Tensor | None = None,
) -> GrownInstances:
    """Multi-object level-set growth: each seed grows inside its own part of S; no two merge.

    Steps, per image (all in C++, no Python loop over objects):

    1. the connected components of ``S = seg != 0`` (``connectivity``, default faces);
    2. each voxel of S gets an owner seed: the only seed present in its component if the
       component holds voxels of exactly one seed; otherwise (several seeds, or none) the
       seed of the nearest seed voxel (exact Euclidean feature transform) -- the
       nearest-seed cut along the mid-lines between seeds;
    3. seed k grows inside its part ``P_k = {x in S : owner(x) = k}`` by the rule of
       :func:`levelset_grow`: ``A_k | {x in P_k : d(x, A_k) - lam * d(x, complement(P_k)) <= 0}``;
    4. the parts are disjoint, so the grown seeds are merged without conflict. Every seed
       voxel keeps its id. With one seed this equals ``levelset_grow(seeds > 0, seg, lam)``.

    Multi-class: the foreground is grown as one class; each grown region then takes the
    class of its seed (``seed_classes``, a label map giving the class at the seed voxels;
    if a seed covers several classes its largest class id wins).

    Args:
        seeds: ``(B, *spatial)`` integer instance ids, 0 = no seed, CPU or CUDA.
        seg: predicted segmentation S (non-zero = foreground), same shape.
        lam: growth speed, >= 0.
        spacing: voxel size per spatial axis.
        connectivity: for the components of S: 4/8 (2D), 6/18/26 (3D).
        seed_classes: optional ``(B, *spatial)`` integer classes.

    Returns:
        :class:`GrownInstances` ``(instances, classes)``, int64 ``(B, *spatial)``;
        ``classes`` is ``instances > 0`` without ``seed_classes``. Not differentiable.
    """
    spatial = _check_pair("grow_instances", seeds, seg, "seeds", "seg")
    if seeds.dtype.is_floating_point:
        raise TypeError(f"grow_instances: seeds must hold integer instance ids, got {seeds.dtype}")
    lam = _check_lam("grow_instances", lam)
    sp = _check_spacing("grow_instances", spacing, spatial)
    conn = _check_connectivity("grow_instances", connectivity, spatial)
    instances = torch.ops.mtseg.grow_instances(seeds, seg, lam, sp, conn)
    if seed_classes is None:
        return GrownInstances(instances, (instances > 0).long())
    if not isinstance(seed_classes, Tensor) or seed_classes.shape != seeds.shape or seed_classes.dtype.is_floating_point:
        raise ValueError("grow_instances: seed_classes must be an integer tensor of the seeds' shape")
    batch = seeds.shape[0]
    ids = seeds.long().reshape(batch, -1)
    n_ids = int(ids.max()) + 1 if ids.numel() else 1
    table = torch.zeros(batch, n_ids, dtype=torch.int64, device=seeds.device)
    table.scatter_reduce_(1, ids, seed_classes.long().reshape(batch, -1).where(ids > 0, 0), reduce="amax")
    classes = torch.gather(table, 1, instances.reshape(batch, -1)).reshape(instances.shape)
    return GrownInstances(instances, classes)


# --------------------------------------------------------------------------------------
# Surface metrics
# --------------------------------------------------------------------------------------
class SurfaceMetrics(NamedTuple):
    """Hausdorff distance, percentile Hausdorff distance and ASSD, in physical units."""

    hausdorff: Tensor
    hausdorff_percentile: Tensor
    assd: Tensor


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


def _percentile(values: Tensor, valid: Tensor, q: float) -> Tensor:
    """Per-row ``numpy.percentile(values[valid], q)`` (linear interpolation); rows without values -> nan."""
    n = valid.sum(1)
    ordered = values.where(valid, torch.inf).sort(1).values
    pos = (n - 1).clamp(min=0).to(values.dtype) * (q / 100.0)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo = ordered.gather(1, lo[:, None])[:, 0]
    v_hi = ordered.gather(1, hi[:, None])[:, 0]
    frac = pos - lo.to(values.dtype)
    out = torch.where(v_hi == v_lo, v_lo, v_lo + (v_hi - v_lo) * frac)
    return out.where(n > 0, torch.nan)


def _binary_surface_metrics(pred: Tensor, target: Tensor, spacing, percentile: float, connectivity: int) -> SurfaceMetrics:
    batch = pred.shape[0]
    sp_p, sp_t = _surface(pred, connectivity), _surface(target, connectivity)
    # Distance from every voxel to the other mask's surface (+inf where it has none).
    to_t = torch.ops.mtseg.edt(~sp_t, spacing, False, False, torch.float64).reshape(batch, -1)
    to_p = torch.ops.mtseg.edt(~sp_p, spacing, False, False, torch.float64).reshape(batch, -1)
    vp, vt = sp_p.reshape(batch, -1), sp_t.reshape(batch, -1)
    d_pt = to_t.where(vp, 0.0)
    d_tp = to_p.where(vt, 0.0)
    hd = torch.maximum(d_pt.amax(1), d_tp.amax(1))
    hdp = torch.maximum(_percentile(to_t, vp, percentile), _percentile(to_p, vt, percentile))
    assd = (d_pt.sum(1) + d_tp.sum(1)) / (vp.sum(1) + vt.sum(1)).to(torch.float64)
    empty_p, empty_t = ~vp.any(1), ~vt.any(1)
    one = empty_p ^ empty_t
    both = empty_p & empty_t
    results = []
    for value in (hd, hdp, assd):
        value = value.where(~one, torch.inf).where(~both, torch.nan)
        results.append(value)
    return SurfaceMetrics(*results)


def surface_metrics(
    pred: Tensor,
    target: Tensor,
    spacing: float | Sequence[float] | None = None,
    percentile: float = 95.0,
    connectivity: int = 1,
    num_classes: int | None = None,
    include_background: bool = False,
) -> SurfaceMetrics:
    """Hausdorff distance (max and a percentile) and average symmetric surface distance.

    Definitions (MONAI's ``compute_hausdorff_distance`` / ``compute_average_surface_distance``):

    * surface of a mask: ``mask XOR erosion(mask)``, the erosion with the structure
      ``scipy.ndimage.generate_binary_structure(ndim, connectivity)`` (``connectivity=1``:
      faces) and the outside of the image as background, so mask voxels on the image
      border are surface voxels;
    * ``d_pt``: for every surface voxel of ``pred``, the Euclidean distance (with
      ``spacing``) to the nearest surface voxel of ``target`` (:func:`edt` of the
      complement of that surface); ``d_tp`` the other way;
    * Hausdorff = ``max(max d_pt, max d_tp)``; percentile Hausdorff =
      ``max(percentile(d_pt, q), percentile(d_tp, q))`` with numpy's linear interpolation;
      ASSD = ``mean(concat(d_pt, d_tp))``.

    Empty masks: both empty -> ``nan`` (nothing to compare: exclude it with ``nanmean``);
    exactly one empty -> ``+inf``.

    Args:
        pred, target: binary masks ``(B, *spatial)`` (non-zero = foreground), or integer
            label maps with ``num_classes``.
        spacing: voxel size per spatial axis (results in its units).
        percentile: in [0, 100], default 95 (HD95).
        connectivity: 1..ndim, the erosion structure.
        num_classes: label maps: compute per class ``c`` for the masks ``pred == c``,
            ``target == c``.
        include_background: with ``num_classes``, include class 0.

    Returns:
        :class:`SurfaceMetrics` of float64 tensors, ``(B,)`` for masks, ``(B, K)`` per class
        (``K = num_classes``, or ``num_classes - 1`` without background). Not differentiable.
    """
    spatial = _check_pair("surface_metrics", pred, target, "pred", "target")
    sp = _check_spacing("surface_metrics", spacing, spatial)
    if not 0 <= percentile <= 100:
        raise ValueError(f"surface_metrics: percentile must be in [0, 100], got {percentile}")
    if connectivity not in range(1, spatial + 1):
        raise ValueError(f"surface_metrics: connectivity must be in 1..{spatial}, got {connectivity}")
    if num_classes is None:
        return _binary_surface_metrics(pred != 0, target != 0, sp, percentile, connectivity)
    if pred.dtype.is_floating_point or target.dtype.is_floating_point or pred.dtype == torch.bool:
        raise TypeError("surface_metrics: label maps (with num_classes) must be integer tensors")
    if num_classes < 1:
        raise ValueError(f"surface_metrics: num_classes must be positive, got {num_classes}")
    first = 0 if include_background else 1
    classes = torch.arange(first, num_classes, device=pred.device).view(1, -1, *([1] * spatial))
    k = num_classes - first
    shape = pred.shape
    p = (pred.unsqueeze(1) == classes).reshape(-1, *shape[1:])
    t = (target.unsqueeze(1) == classes).reshape(-1, *shape[1:])
    out = _binary_surface_metrics(p, t, sp, percentile, connectivity)
    return SurfaceMetrics(*(v.view(shape[0], k) for v in out))


def hausdorff_distance(
    pred: Tensor,
    target: Tensor,
    spacing: float | Sequence[float] | None = None,
    percentile: float | None = None,
    **kwargs,
) -> Tensor:
    """Hausdorff distance (``percentile=None``) or percentile Hausdorff (e.g. 95); see :func:`surface_metrics`."""
    m = surface_metrics(pred, target, spacing, 95.0 if percentile is None else percentile, **kwargs)
    return m.hausdorff if percentile is None else m.hausdorff_percentile


def average_surface_distance(
    pred: Tensor, target: Tensor, spacing: float | Sequence[float] | None = None, **kwargs
) -> Tensor:
    """Average symmetric surface distance (ASSD); see :func:`surface_metrics`."""
    return surface_metrics(pred, target, spacing, **kwargs).assd


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class EDT(nn.Module):
    """Module form of :func:`edt`.

    Shape:
        - Input: ``(B, H, W)`` or ``(B, D, H, W)``
        - Output: same shape, float32 (or ``dtype``)
    """

    def __init__(self, spacing=None, squared: bool = False, signed: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.spacing, self.squared, self.signed, self.dtype = spacing, squared, signed, dtype

    def forward(self, mask: Tensor) -> Tensor:
        return edt(mask, self.spacing, self.squared, self.signed, self.dtype)

    def extra_repr(self) -> str:
        return f"spacing={self.spacing}, squared={self.squared}, signed={self.signed}, dtype={self.dtype}"


class LevelSetGrow(nn.Module):
    """Module form of :func:`levelset_grow`: ``forward(approx, seg) -> bool mask``."""

    def __init__(self, lam: float, spacing=None):
        super().__init__()
        self.lam = _check_lam("LevelSetGrow", lam)
        self.spacing = spacing

    def forward(self, approx: Tensor, seg: Tensor) -> Tensor:
        return levelset_grow(approx, seg, self.lam, self.spacing)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, spacing={self.spacing}"


class SurfaceDistance(nn.Module):
    """Module form of :func:`surface_metrics`: ``forward(pred, target) -> SurfaceMetrics``."""

    def __init__(self, spacing=None, percentile: float = 95.0, connectivity: int = 1, num_classes: int | None = None,
                 include_background: bool = False):
        super().__init__()
        self.spacing, self.percentile, self.connectivity = spacing, percentile, connectivity
        self.num_classes, self.include_background = num_classes, include_background

    def forward(self, pred: Tensor, target: Tensor) -> SurfaceMetrics:
        return surface_metrics(pred, target, self.spacing, self.percentile, self.connectivity, self.num_classes,
                               self.include_background)
