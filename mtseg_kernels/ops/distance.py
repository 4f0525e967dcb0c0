"""Exact Euclidean distance transforms, connected components and level-set growth,
batched, as PyTorch operators.

Masks are batched: ``(B, H, W)`` (2D) or ``(B, D, H, W)`` (3D); bool, any integer dtype
(signed or unsigned: uint8 to uint64) or floating dtype, non-zero means foreground (NaN
is rejected; a bool tensor holding bytes other than 0/1, e.g. a uint8 tensor viewed as
bool, counts every non-zero byte as foreground, as torch does). ``spacing`` is the
physical size of a voxel per spatial axis (``(sy, sx)`` or ``(sz, sy, sx)``), default 1,
positive and finite, largest / smallest at most 2^500 (beyond that the squares of the
scaled spacings leave double's range). An unbatched 2D mask needs ``mask[None]``; a
single 3D volume ``volume[None]``.

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

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "EDT",
    "GrownInstances",
    "LevelSetGrow",
    "connected_components",
    "edt",
    "grow_instances",
    "levelset_grow",
    "signed_edt",
]

_INTEGER_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_DTYPES = (torch.bool, *_INTEGER_DTYPES, *_FLOAT_DTYPES)
_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}
_MAX_SPACING_RATIO_LOG2 = 500


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
    if math.ldexp(max(values), -_MAX_SPACING_RATIO_LOG2) > min(values):
        raise ValueError(
            f"{op}: the spacing values differ by too much (largest / smallest must be at most "
            f"2^{_MAX_SPACING_RATIO_LOG2}), got {values}"
        )
    return values


def _check_edt_dtype(dtype) -> torch.dtype:
    if dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"edt: dtype must be torch.float32 or torch.float64, got {dtype}")
    return torch.float32 if dtype is None else dtype


def _check_edt_range(shape: Sequence[int], spacing: list[float] | None, dtype: torch.dtype, squared: bool) -> None:
    """Every finite distance (its square when ``squared``) must be a normal number of
    ``dtype``: the C++ operator checks the same."""
    spacing = spacing if spacing is not None else [1.0] * len(shape)
    info = torch.finfo(dtype)
    far = math.hypot(*(max(int(n) - 1, 0) * s for n, s in zip(shape, spacing)))
    k = 2.0 if squared else 1.0
    log_far = k * math.log2(far) if far > 0 else -math.inf
    if not (log_far < math.log2(info.max) and k * math.log2(min(spacing)) >= math.log2(info.tiny)):
        what = "squared distances" if squared else "distances"
        raise ValueError(
            f"edt: with spacing {spacing} the {what} of a mask of this size do not fit {dtype}; "
            "use dtype=torch.float64 or a spacing in other units"
        )


def _check_seeds(seeds: Tensor) -> None:
    if seeds.dtype.is_floating_point:
        raise TypeError(f"grow_instances: seeds must hold integer instance ids (0 = no seed), got {seeds.dtype}")


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
# They check what the C++ operators check wherever shapes, dtypes and arguments suffice,
# so that bad input fails while torch.compile traces, with the same message.
@torch.library.register_fake("mtseg::edt")
def _edt_fake(mask, spacing=None, squared=False, signed=False, dtype=None):
    spatial = _check_mask("edt", "mask", mask)
    sp = _check_spacing("edt", spacing, spatial)
    out_dtype = _check_edt_dtype(dtype)
    _check_edt_range(mask.shape[1:], sp, out_dtype, bool(squared))
    return mask.new_empty(mask.shape, dtype=out_dtype)


@torch.library.register_fake("mtseg::connected_components")
def _connected_components_fake(mask, connectivity):
    spatial = _check_mask("connected_components", "mask", mask)
    _check_connectivity("connected_components", connectivity, spatial)
    return mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty((mask.shape[0],), dtype=torch.int64)


@torch.library.register_fake("mtseg::levelset_grow")
def _levelset_grow_fake(approx, seg, lam, spacing=None):
    spatial = _check_pair("levelset_grow", approx, seg, "approx", "seg")
    _check_lam("levelset_grow", lam)
    _check_spacing("levelset_grow", spacing, spatial)
    return approx.new_empty(approx.shape, dtype=torch.bool)


@torch.library.register_fake("mtseg::grow_instances")
def _grow_instances_fake(seeds, seg, lam, spacing=None, connectivity=0):
    spatial = _check_pair("grow_instances", seeds, seg, "seeds", "seg")
    _check_seeds(seeds)
    _check_lam("grow_instances", lam)
    _check_spacing("grow_instances", spacing, spatial)
    _check_connectivity("grow_instances", None if connectivity == 0 else connectivity, spatial)
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
    _check_edt_dtype(dtype)
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
    _check_seeds(seeds)
    lam = _check_lam("grow_instances", lam)
    sp = _check_spacing("grow_instances", spacing, spatial)
    conn = _check_connectivity("grow_instances", connectivity, spatial)
    instances = torch.ops.mtseg.grow_instances(seeds, seg, lam, sp, conn)
    if seed_classes is None:
        return GrownInstances(instances, (instances > 0).long())
    if (
        not isinstance(seed_classes, Tensor)
        or seed_classes.shape != seeds.shape
        or seed_classes.dtype.is_floating_point
        or seed_classes.dtype == torch.bool
    ):
        got = (
            f"{seed_classes.dtype} of shape {tuple(seed_classes.shape)}"
            if isinstance(seed_classes, Tensor)
            else type(seed_classes).__name__
        )
        raise ValueError(
            f"grow_instances: seed_classes must be an integer tensor of the seeds' shape {tuple(seeds.shape)}, got {got}"
        )
    return GrownInstances(instances, _instance_classes(seeds, instances, seed_classes))


def _instance_classes(seeds: Tensor, instances: Tensor, seed_classes: Tensor) -> Tensor:
    """The class of every grown voxel: the largest class among its seed's voxels (at least 0).

    Seeds are keyed by their (image, id) pairs, numbered by ``torch.unique``: memory
    follows the number of voxels, never the size of the ids.
    """
    batch = seeds.shape[0]
    ids = (seeds != 0).long() if seeds.dtype == torch.bool else seeds.long()
    ids, inst = ids.reshape(batch, -1), instances.reshape(batch, -1)
    image = torch.arange(batch, device=seeds.device)[:, None].expand_as(ids)
    at_seed, grown = ids > 0, inst > 0
    keys = torch.cat([torch.stack([image[at_seed], ids[at_seed]]), torch.stack([image[grown], inst[grown]])], dim=1)
    _, slot = torch.unique(keys, dim=1, return_inverse=True)
    n_seed = int(at_seed.sum())
    table = torch.zeros(keys.shape[1], dtype=torch.int64, device=seeds.device)
    table.scatter_reduce_(0, slot[:n_seed], seed_classes.reshape(batch, -1)[at_seed].long(), reduce="amax")
    classes = torch.zeros_like(inst)
    classes[grown] = table[slot[n_seed:]]
    return classes.reshape(instances.shape)


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
