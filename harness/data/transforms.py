"""Collation and batched, seeded augmentation on the device.

:func:`collate` stacks sample dicts into a batch dict (dropping the ``None`` of skipped
samples and counting them in ``batch["n_skipped"]``).

:class:`BatchAugment` transforms a collated batch with torch ops on whatever device it is
on, ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images, applying the *same* geometric
transform to the image and to every label key present (``mask``, ``instances``, ``weak``,
``weak_instances``, ``regions``): images are resampled bilinearly, labels by nearest
neighbour (values are preserved exactly). The order is flips -> 90 degree rotations ->
rotation by an arbitrary angle and scaling -> random crop -> contrast -> brightness factor
-> intensity shift -> per-channel (RGB) shift -> noise (image only). Parameters are drawn on the CPU from a ``torch.Generator`` (seeded
with ``seed``), so a run is reproducible on any device; :meth:`BatchAugment.sample_params`
and :meth:`BatchAugment.apply` are exposed separately. After augmentation, HOG targets
can be computed from ``batch["image"]`` on the device, as HOG-MTL requires.

Geometry conventions: flips per spatial axis with probability ``flip_prob``; 90 degree
rotations in the (H, W) plane (odd multiples only when H == W, otherwise 0 or 180 so the
batch keeps its shape); arbitrary rotations (uniform in +-``rotate`` degrees) and scaling
(uniform in ``scale``) are in the (H, W) plane about the centre, with the output the same
size as the input; pixels that come from outside the input are 0 in the image and
``ignore_index`` in ``mask``/``weak`` (0 in instance maps and regions). A ``presence``
vector in the batch is recomputed from the transformed ``mask`` when a crop or an
affine resampling may have removed classes (flips and 90 degree turns cannot).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

LABEL_KEYS = ("mask", "instances", "weak", "weak_instances", "regions")
IGNORE_FILL_KEYS = ("mask", "weak")


def collate(samples: Sequence[dict | None]) -> dict:
    """Stack sample dicts: tensors of equal shape -> stacked, strings -> lists, numbers -> tensors.

    ``None`` entries (samples skipped with ``on_error="skip"``) are dropped and counted in
    ``batch["n_skipped"]``. Tensors of different shapes (uncropped images of different
    sizes) are an error that names the cases: crop or resize them in the dataset.
    """
    kept = [s for s in samples if s is not None]
    out: dict = {"n_skipped": len(samples) - len(kept)}
    if not kept:
        return out
    keys = list(kept[0])
    for s in kept[1:]:
        if set(s) != set(keys):
            raise ValueError(f"samples have different keys: {sorted(keys)} vs {sorted(s)}")
    for key in keys:
        vals = [s[key] for s in kept]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                ids = [s.get("case_id", "?") for s in kept]
                raise ValueError(f"cannot stack {key!r}: shapes {sorted(shapes)} differ (cases {ids}); crop or resize first")
            out[key] = torch.stack(vals)
        elif isinstance(v0, bool):
            out[key] = torch.tensor(vals, dtype=torch.bool)
        elif isinstance(v0, (int, float)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out


def presence_from_mask(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``(B, *spatial)`` labels -> float ``(B, K)``: 1 where class k occurs (ignored pixels do not count)."""
    b = mask.shape[0]
    flat = mask.reshape(b, -1).long()
    flat = torch.where((flat == ignore_index) | (flat < 0) | (flat >= num_classes), torch.full_like(flat, num_classes), flat)
    hits = torch.zeros(b, num_classes + 1, device=mask.device)
    hits.scatter_(1, flat, 1.0)
    return hits[:, :num_classes]


def _rand(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


class BatchAugment:
    """Seeded, batched geometric + intensity augmentation (see the module docstring).

    Args:
        flip_prob: probability of flipping each spatial axis (``flip_axes`` picks which,
            as negative dims, default: the last two, i.e. H and W).
        rot90: random multiples of 90 degrees in the (H, W) plane.
        rotate: maximum absolute angle in degrees of the arbitrary rotation (0 = off).
        scale: ``(low, high)`` zoom factor range (> 1 zooms in); ``(1, 1)`` = off.
        crop: spatial size of a random crop (same for the whole batch), or ``None``.
        brightness: maximum absolute additive shift of the image; contrast: maximum
            relative change of the multiplicative factor (``1 +- contrast``) applied about
            each image's mean; brightness_factor: ``(low, high)`` range of a factor that
            multiplies the whole image (``(1, 1)`` = off); rgb_shift: maximum absolute
            additive shift drawn per image *and channel*; noise_std: std of additive
            Gaussian noise. (TDSNet's ROBOT18 recipe: flips, ``rgb_shift``,
            ``brightness_factor=(0.9, 1.1)``, ``contrast=0.1``.)
        seed: seeds the parameter generator (``None``: torch's default generator).
    """

    def __init__(self, *, flip_prob: float = 0.5, flip_axes: Iterable[int] = (-2, -1), rot90: bool = False,
                 rotate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0), crop: Sequence[int] | None = None,
                 brightness: float = 0.0, contrast: float = 0.0, noise_std: float = 0.0,
                 brightness_factor: tuple[float, float] = (1.0, 1.0), rgb_shift: float = 0.0,
                 label_keys: Sequence[str] = LABEL_KEYS, ignore_index: int = 255, seed: int | None = None):
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if scale[0] <= 0 or scale[1] < scale[0]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if brightness_factor[0] <= 0 or brightness_factor[1] < brightness_factor[0]:
            raise ValueError(f"brightness_factor must be (low, high) with 0 < low <= high, got {brightness_factor}")
        for name, v in (("brightness", brightness), ("contrast", contrast), ("rgb_shift", rgb_shift),
                        ("noise_std", noise_std)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.brightness_factor = (float(brightness_factor[0]), float(brightness_factor[1]))
        self.rgb_shift = float(rgb_shift)
        self.flip_prob, self.flip_axes = flip_prob, tuple(int(a) for a in flip_axes)
        self.rot90, self.rotate, self.scale = rot90, float(rotate), (float(scale[0]), float(scale[1]))
        self.crop = None if crop is None else tuple(int(c) for c in crop)
        self.brightness, self.contrast, self.noise_std = float(brightness), float(contrast), float(noise_std)
        self.label_keys = tuple(label_keys)
        self.ignore_index = ignore_index
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    # ------------------------------------------------------------------ parameters

    def sample_params(self, batch_size: int, spatial: Sequence[int], channels: int = 3) -> dict:
        """Random parameters of one batch (``channels``: image channels, read by ``rgb_shift`` only)."""
        g, b = self.generator, batch_size
        nd = len(spatial)
        if nd not in (2, 3):
            raise ValueError(f"expected 2 or 3 spatial dims, got spatial shape {tuple(spatial)}")
        p: dict = {}
        p["flip"] = {a: (torch.rand(b, generator=g) < self.flip_prob) for a in self.flip_axes}
        if self.rot90:
            k = torch.randint(0, 4, (b,), generator=g)
            if spatial[-1] != spatial[-2]:
                k = (k // 2) * 2
            p["rot90"] = k
        if self.rotate > 0 or self.scale != (1.0, 1.0):
            p["angle"] = _rand(g, b, -self.rotate, self.rotate)
            p["zoom"] = _rand(g, b, *self.scale)
        if self.crop is not None:
            if len(self.crop) != nd:
                raise ValueError(f"crop {self.crop} must have {nd} sizes for spatial shape {tuple(spatial)}")
            if any(c > s for c, s in zip(self.crop, spatial)):
                raise ValueError(f"crop {self.crop} is larger than the images {tuple(spatial)}")
            p["crop_start"] = torch.stack(
                [torch.randint(0, s - c + 1, (b,), generator=g) for c, s in zip(self.crop, spatial)], dim=1)
        if self.brightness > 0:
            p["shift"] = _rand(g, b, -self.brightness, self.brightness)
        if self.contrast > 0:
            p["gain"] = _rand(g, b, 1 - self.contrast, 1 + self.contrast)
        if self.brightness_factor != (1.0, 1.0):
            p["factor"] = _rand(g, b, *self.brightness_factor)
        if self.rgb_shift > 0:
            p["channel_shift"] = self.rgb_shift * (2 * torch.rand(b, int(channels), generator=g, dtype=torch.float64) - 1)
        if self.noise_std > 0:
            p["noise_seed"] = int(torch.randint(0, 2**62, (1,), generator=g))
        return p

    def __call__(self, batch: dict) -> dict:
        img = batch["image"]
        if img.dim() not in (4, 5):
            raise ValueError(f"image must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(img.shape)}")
        return self.apply(batch, self.sample_params(img.shape[0], img.shape[2:], img.shape[1]))

    # ------------------------------------------------------------------ application

    def apply(self, batch: dict, params: dict) -> dict:
        out = dict(batch)
        img = batch["image"]
        nd = img.dim() - 2
        keys = ["image"] + [k for k in self.label_keys if k in batch and isinstance(batch[k], torch.Tensor)]
        tensors, squeeze = {}, {}
        for k in keys:
            t = batch[k]
            if t.shape[0] != img.shape[0] or tuple(t.shape[-nd:]) != tuple(img.shape[-nd:]):
                raise ValueError(f"{k!r} has shape {tuple(t.shape)}, image {tuple(img.shape)}: spatial sizes must match")
            squeeze[k] = t.dim() == nd + 1
            tensors[k] = t.unsqueeze(1) if squeeze[k] else t
        for k, t in tensors.items():
            tensors[k] = self._geometry(t, params, label=(k != "image"), fill=self._fill(k))
        x = tensors["image"]
        if not x.is_floating_point():
            x = x.float()
        dev, dt = x.device, x.dtype
        shape = (-1,) + (1,) * (x.dim() - 1)
        if "gain" in params:
            mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
            x = (x - mean) * params["gain"].to(dev, dt).view(shape) + mean
        if "factor" in params:
            x = x * params["factor"].to(dev, dt).view(shape)
        if "shift" in params:
            x = x + params["shift"].to(dev, dt).view(shape)
        if "channel_shift" in params:
            cs = params["channel_shift"]
            if cs.shape[1] != x.shape[1]:
                raise ValueError(f"rgb_shift was drawn for {cs.shape[1]} channels, the image has {x.shape[1]}")
            x = x + cs.to(dev, dt).view(cs.shape + (1,) * (x.dim() - 2))
        if "noise_seed" in params:
            g = torch.Generator(device=dev)
            g.manual_seed(params["noise_seed"])
            x = x + self.noise_std * torch.randn(x.shape, generator=g, device=dev, dtype=dt)
        tensors["image"] = x
        for k, t in tensors.items():
            out[k] = t.squeeze(1) if squeeze[k] else t
        if "presence" in batch and "mask" in out and any(k in params for k in ("angle", "crop_start")):
            out["presence"] = presence_from_mask(out["mask"], batch["presence"].shape[1], self.ignore_index).to(
                batch["presence"].dtype)
        return out

    def _fill(self, key):
        return self.ignore_index if key in IGNORE_FILL_KEYS else 0

    def _geometry(self, t: torch.Tensor, p: dict, label: bool, fill) -> torch.Tensor:
        b = t.shape[0]
        dev = t.device
        for axis, flag in p.get("flip", {}).items():
            if flag.any():
                m = flag.to(dev).view((-1,) + (1,) * (t.dim() - 1))
                t = torch.where(m, t.flip(axis), t)
        if "rot90" in p and (p["rot90"] != 0).any():
            t = torch.stack([torch.rot90(t[i], int(p["rot90"][i]), dims=(-2, -1)) for i in range(b)])
        if "angle" in p:
            t = self._affine(t, p["angle"], p["zoom"], label, fill)
        if "crop_start" in p:
            starts = p["crop_start"].tolist()
            sl = [tuple(slice(s, s + c) for s, c in zip(st, self.crop)) for st in starts]
            t = torch.stack([t[(i, slice(None)) + sl[i]] for i in range(b)])
        return t

    @staticmethod
    def _theta(angle_deg, zoom, h, w, nd):
        """Normalised affine_grid matrices: output pixel -> input pixel = R(angle) / zoom, about the centre."""
        a = angle_deg * math.pi / 180
        c, s = torch.cos(a) / zoom, torch.sin(a) / zoom
        # In pixel units (x = column, y = row): [x_in, y_in] = [[c, -s], [s, c]] [x_out, y_out];
        # normalised coordinates divide x by w/2 and y by h/2.
        r = torch.stack([torch.stack([c, -s * h / w], -1), torch.stack([s * w / h, c], -1)], -2)
        b = r.shape[0]
        if nd == 2:
            return torch.cat([r, torch.zeros(b, 2, 1, dtype=r.dtype)], -1)
        theta = torch.zeros(b, 3, 4, dtype=r.dtype)
        theta[:, :2, :2] = r
        theta[:, 2, 2] = 1.0
        return theta

    def _affine(self, t, angle, zoom, label, fill):
        nd = t.dim() - 2
        h, w = t.shape[-2], t.shape[-1]
        theta = self._theta(angle, zoom, h, w, nd)
        dt = t.dtype if t.is_floating_point() else torch.float32
        if label and t.dtype == torch.float64:
            dt = torch.float64
        grid = F.affine_grid(theta.to(t.device, dt), list(t.shape), align_corners=False)
        if not label:
            return F.grid_sample(t.to(dt), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(t.dtype)
        if t.is_floating_point() or t.abs().max() >= 2**24 - 1:
            dt = torch.float64
            grid = grid.double()
        # Labels + 1 so that 0 marks "outside the input" after zero padding.
        moved = F.grid_sample((t.to(dt) + 1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        moved = torch.round(moved).to(t.dtype)
        return torch.where(moved == 0, torch.full_like(moved, fill), moved - 1)
