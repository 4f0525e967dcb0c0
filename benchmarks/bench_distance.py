"""Speed of the distance operators (``edt``, ``connected_components``, ``levelset_grow``)
against their peers, measured in the same run.

Groups (each one pytest-benchmark group, so its contestants are reported together):

* ``edt-2d-512``: one 512x512 mask (an HC18 head mask resized).
* ``edt-2d-16x256``: a batch of 16 256x256 masks (16 HC18 head masks resized).
* ``edt-3d-155x240x240``: one 155x240x240 volume (BraTS size, synthetic tumour-like
  blobs), anisotropic spacing (1.5, 0.9375, 0.9375).
* ``cc-2d-16x256`` / ``cc-3d-155x240x240``: connected components of the same masks cut
  by a grid of 1-voxel lines into many pieces (8- / 26-connectivity).
* ``levelset-hc18-200``: the label update of the recursive-approximation method,
  ``levelset_grow`` with lam = 1 over 200 HC18-sized (540x800) masks: A = the head mask
  eroded by 25 px, S = the head mask dilated by 10 px.
* ``grow-hc18-32``: the multi-object update, ``grow_instances`` with lam = 1 over 32 of
  those masks, the eroded head split into two seeds (left half id 1, right half id 2), so
  that every component needs the nearest-seed cut (no peer: mtseg on CPU and CUDA).

Peers: scipy.ndimage (``distance_transform_edt``, ``label``; single-threaded, Python loop
over images), the ``edt`` package (seung-lab, ``parallel=2``, loop over images), OpenCV
``distanceTransform(DIST_L2, DIST_MASK_PRECISE)`` (2D, loop), ``cc3d`` (loop). mtseg is
one call on the whole batch with ``torch.get_num_threads()`` threads. Inputs are prepared
once per module; the timed functions only compute.

The HC18 masks are the real annotations when the data is found as the tests find it
(the real-data folder, ``$MTSEG_SHARED_DATA``; see docs/testing.md), otherwise
synthetic ellipses of similar size; each row's ``extra_info["masks"]`` says which.

mtseg on CUDA (skipped, with the reason, without a GPU or without the CUDA kernels): the
same call on tensors already on the device, ``torch.cuda.synchronize()`` inside the timed
function, three untimed warm-up calls; each checks its result against the CPU operator
once. ``benchmarks/README.md`` lists the time each case should take from a roofline.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import mtseg_kernels as mk

SLOW_ROUNDS = 3
CUDA_WARMUP_CALLS = 3
SPACING_3D = (1.5, 0.9375, 0.9375)
REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    """The real-data folder, found as the tests find it (``tests/conftest.py``)."""
    env = os.environ.get("MTSEG_SHARED_DATA")
    for path in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if path.is_dir():
            return path
    return None


def mask_source() -> str:
    """What the HC18-shaped inputs are made of, for each row's ``extra_info``."""
    root = data_root()
    return "HC18 annotations" if root and any((root / "hc18" / "training_set").glob("*_HC_Annotation.png")) else (
        "synthetic ellipses (no HC18 data found)"
    )


@functools.lru_cache(maxsize=None)
def hc18_masks(count: int) -> np.ndarray:
    """``count`` filled HC18 head masks (count, 540, 800); synthetic ellipses without the data."""
    from PIL import Image

    root = data_root()
    files = sorted((root / "hc18" / "training_set").glob("*_HC_Annotation.png")) if root else []
    masks = []
    yy, xx = np.mgrid[:540, :800]
    for i in range(count):
        if files:
            outline = np.asarray(Image.open(files[i % len(files)]).convert("L")) > 127
            canvas = np.zeros((540, 800), dtype=bool)  # a few HC18 images are smaller
            canvas[: outline.shape[0], : outline.shape[1]] = outline[:540, :800]
            masks.append(ndi.binary_fill_holes(canvas))
        else:  # pragma: no cover - only without the real data
            a, b = 150 + (i * 7) % 80, 200 + (i * 11) % 90
            masks.append(((yy - 270) / a) ** 2 + ((xx - 400) / b) ** 2 <= 1)
    return np.stack(masks)


def resized(masks: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(masks[:, None].astype(np.float32))
    return (torch.nn.functional.interpolate(t, size=(size, size), mode="nearest")[:, 0] > 0.5).numpy()


@functools.lru_cache(maxsize=None)
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:155, :240, :240]
    v = np.zeros((155, 240, 240), dtype=bool)
    for _ in range(6):
        cz, cy, cx = rng.integers(30, 125), rng.integers(50, 190), rng.integers(50, 190)
        rz, ry, rx = rng.integers(10, 30), rng.integers(15, 45), rng.integers(15, 45)
        v |= ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return v


def _describe(benchmark, runtime_info, group, contestant, role, n_images, size, device="cpu", **extra):
    benchmark.group = group
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(
        contestant=contestant, role=role, device=device, input_dtype="bool", n_images=n_images, image_size=size,
        masks="synthetic ellipsoids" if "3d" in group else mask_source(), **extra
    )


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not mk.backends()["cuda_compiled"]:
        return "mtseg_kernels was built without its CUDA kernels"
    return None


_CUDA_SKIP = _cuda_skip_reason()
requires_cuda = pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")


def _cuda_device() -> str:
    return f"cuda ({torch.cuda.get_device_name()})"


def _bench_cuda(benchmark, fn, *args, **pedantic):
    """Times fn(*args) on the device (synchronised), after warm-up calls; returns its output."""

    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    for _ in range(CUDA_WARMUP_CALLS):
        out = run()
    if pedantic:
        benchmark.pedantic(run, **pedantic)
    else:
        benchmark(run)
    return out


def _bench_mtseg_cuda(benchmark, runtime_info, group, op_name, n_images, size, fn, *args, **extra):
    """The row of an mtseg op on the device: described, timed by _bench_cuda; returns its output."""
    _describe(benchmark, runtime_info, group, f"{op_name} (CUDA, batched)", "mtseg", n_images, size,
              device=_cuda_device(), **extra)
    return _bench_cuda(benchmark, fn, *args)


# --------------------------------------------------------------------------------------
# EDT
# --------------------------------------------------------------------------------------
EDT_CASES = {
    "edt-2d-512": lambda: resized(hc18_masks(1), 512),
    "edt-2d-16x256": lambda: resized(hc18_masks(16), 256),
    "edt-3d-155x240x240": lambda: volume()[None],
}


@pytest.fixture(scope="module", params=list(EDT_CASES))
def edt_case(request):
    masks = np.ascontiguousarray(EDT_CASES[request.param]())
    spacing = SPACING_3D if masks.ndim == 4 else None
    return request.param, masks, spacing


def _size(masks):
    return "x".join(map(str, masks.shape[1:]))


def test_edt_mtseg(benchmark, runtime_info, edt_case):
    group, masks, spacing = edt_case
    _describe(benchmark, runtime_info, group, "mtseg.edt (CPU, batched)", "mtseg", len(masks), _size(masks))
    t = torch.from_numpy(masks)
    out = benchmark(mk.edt, t, spacing)
    np.testing.assert_allclose(out[0].numpy(), ndi.distance_transform_edt(masks[0], sampling=spacing), atol=1e-4)


@pytest.mark.cuda
@requires_cuda
def test_edt_mtseg_cuda(benchmark, runtime_info, edt_case):
    group, masks, spacing = edt_case
    t = torch.from_numpy(masks)
    out = _bench_mtseg_cuda(benchmark, runtime_info, group, "mtseg.edt", len(masks), _size(masks), mk.edt, t.cuda(),
                            spacing)
    assert torch.equal(out.cpu(), mk.edt(t, spacing))


def test_edt_scipy(benchmark, runtime_info, edt_case):
    group, masks, spacing = edt_case
    _describe(benchmark, runtime_info, group, "scipy distance_transform_edt (loop)", "peer", len(masks), _size(masks))
    benchmark.pedantic(lambda: [ndi.distance_transform_edt(m, sampling=spacing) for m in masks], rounds=SLOW_ROUNDS,
                       iterations=1)


def test_edt_edt_package(benchmark, runtime_info, edt_case):
    edt_pkg = pytest.importorskip("edt")
    group, masks, spacing = edt_case
    _describe(benchmark, runtime_info, group, "edt package (parallel=2, loop)", "peer", len(masks), _size(masks))
    benchmark(lambda: [edt_pkg.edt(m, anisotropy=spacing, parallel=2) for m in masks])


def test_edt_opencv(benchmark, runtime_info, edt_case):
    group, masks, spacing = edt_case
    if masks.ndim != 3:
        pytest.skip("OpenCV's distanceTransform is 2D only")
    _describe(benchmark, runtime_info, group, "OpenCV distanceTransform (L2, precise, loop)", "peer", len(masks),
              _size(masks), cv2_input="uint8")
    u8 = [np.ascontiguousarray(m.astype(np.uint8)) for m in masks]
    benchmark(lambda: [cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) for m in u8])


# --------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------
def _pieces(masks):
    """The masks with a grid of 1-voxel cuts, so that there are many components."""
    out = masks.copy()
    out[..., ::17] = False
    out[..., ::23, :] = False
    return out


CC_CASES = {
    "cc-2d-16x256": lambda: _pieces(resized(hc18_masks(16), 256)),
    "cc-3d-155x240x240": lambda: _pieces(volume()[None]),
}


@pytest.fixture(scope="module", params=list(CC_CASES))
def cc_case(request):
    masks = np.ascontiguousarray(CC_CASES[request.param]())
    return request.param, masks, 8 if masks.ndim == 3 else 26


def test_cc_mtseg(benchmark, runtime_info, cc_case):
    group, masks, conn = cc_case
    _describe(benchmark, runtime_info, group, "mtseg.connected_components (CPU, batched)", "mtseg", len(masks),
              _size(masks), connectivity=conn)
    labels, counts = benchmark(mk.connected_components, torch.from_numpy(masks), conn)
    assert counts[0].item() == ndi.label(masks[0], np.ones((3,) * (masks.ndim - 1)))[1]


@pytest.mark.cuda
@requires_cuda
def test_cc_mtseg_cuda(benchmark, runtime_info, cc_case):
    group, masks, conn = cc_case
    _describe(benchmark, runtime_info, group, "mtseg.connected_components (CUDA, batched)", "mtseg", len(masks),
              _size(masks), device=_cuda_device(), connectivity=conn)
    t = torch.from_numpy(masks)
    labels, counts = _bench_cuda(benchmark, mk.connected_components, t.cuda(), conn)
    cpu = mk.connected_components(t, conn)
    assert torch.equal(labels.cpu(), cpu[0]) and torch.equal(counts.cpu(), cpu[1])


def test_cc_scipy(benchmark, runtime_info, cc_case):
    group, masks, conn = cc_case
    _describe(benchmark, runtime_info, group, "scipy label (loop)", "peer", len(masks), _size(masks), connectivity=conn)
    structure = np.ones((3,) * (masks.ndim - 1))
    benchmark.pedantic(lambda: [ndi.label(m, structure) for m in masks], rounds=SLOW_ROUNDS, iterations=1)


def test_cc_cc3d(benchmark, runtime_info, cc_case):
    cc3d = pytest.importorskip("cc3d")
    group, masks, conn = cc_case
    _describe(benchmark, runtime_info, group, "cc3d (loop)", "peer", len(masks), _size(masks), connectivity=conn)
    benchmark(lambda: [cc3d.connected_components(m, connectivity=conn, binary_image=True) for m in masks])


# --------------------------------------------------------------------------------------
# Level-set label update (recursive approximation)
# --------------------------------------------------------------------------------------
LAM = 1.0
N_UPDATE = 200


@functools.lru_cache(maxsize=None)
def _update_masks():
    masks = hc18_masks(N_UPDATE)
    approx = ndi.binary_erosion(masks, np.ones((1, 51, 51), bool))
    seg = ndi.binary_dilation(masks, np.ones((1, 21, 21), bool))
    return approx, seg


@pytest.fixture(scope="module")
def update_inputs():
    return _update_masks()


def _update_with(edt_fn, approx, seg):
    """The level-set update of each image from two EDTs computed by ``edt_fn``."""
    out = np.empty_like(approx)
    for i, (a, s) in enumerate(zip(approx, seg)):
        phi = edt_fn(~a) - LAM * edt_fn(s)
        out[i] = a | (phi <= 0)
    return out


def scipy_update(approx, seg):
    return _update_with(ndi.distance_transform_edt, approx, seg)


def edt_pkg_update(approx, seg):
    import edt as edt_pkg

    return _update_with(functools.partial(edt_pkg.edt, parallel=2), approx, seg)


def test_update_mtseg(benchmark, runtime_info, update_inputs):
    approx, seg = update_inputs
    _describe(benchmark, runtime_info, "levelset-hc18-200", "mtseg.levelset_grow (CPU, batched)", "mtseg", N_UPDATE,
              "540x800", lam=LAM)
    a, s = torch.from_numpy(approx), torch.from_numpy(seg)
    out = benchmark.pedantic(mk.levelset_grow, (a, s, LAM), rounds=5, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(out[:4].numpy(), scipy_update(approx[:4], seg[:4]))


@pytest.mark.cuda
@requires_cuda
def test_update_mtseg_cuda(benchmark, runtime_info, update_inputs):
    approx, seg = update_inputs
    a, s = torch.from_numpy(approx).cuda(), torch.from_numpy(seg).cuda()
    out = _bench_mtseg_cuda(benchmark, runtime_info, "levelset-hc18-200", "mtseg.levelset_grow", N_UPDATE, "540x800",
                            mk.levelset_grow, a, s, LAM, lam=LAM)
    np.testing.assert_array_equal(out[:4].cpu().numpy(), scipy_update(approx[:4], seg[:4]))


def test_update_scipy(benchmark, runtime_info, update_inputs):
    approx, seg = update_inputs
    _describe(benchmark, runtime_info, "levelset-hc18-200", "scipy (2 EDTs per image, loop)", "peer", N_UPDATE,
              "540x800", lam=LAM)
    benchmark.pedantic(scipy_update, (approx, seg), rounds=SLOW_ROUNDS, iterations=1)


def test_update_edt_package(benchmark, runtime_info, update_inputs):
    pytest.importorskip("edt")
    approx, seg = update_inputs
    _describe(benchmark, runtime_info, "levelset-hc18-200", "edt package (parallel=2, 2 EDTs per image, loop)", "peer",
              N_UPDATE, "540x800", lam=LAM)
    benchmark.pedantic(edt_pkg_update, (approx, seg), rounds=SLOW_ROUNDS, iterations=1)


# --------------------------------------------------------------------------------------
# Multi-object update (grow_instances): mtseg on CPU and CUDA, no peer
# --------------------------------------------------------------------------------------
N_GROW = 32


@pytest.fixture(scope="module")
def grow_inputs():
    approx, seg = (x[:N_GROW] for x in _update_masks())
    seeds = approx.astype(np.int64)
    seeds[:, :, 400:] *= 2  # right half: another seed in the same component of S
    return torch.from_numpy(seeds), torch.from_numpy(seg)


def test_grow_mtseg(benchmark, runtime_info, grow_inputs):
    seeds, seg = grow_inputs
    _describe(benchmark, runtime_info, "grow-hc18-32", "mtseg.grow_instances (CPU, batched)", "mtseg", N_GROW,
              "540x800", lam=LAM)
    benchmark.pedantic(mk.grow_instances, (seeds, seg, LAM), rounds=SLOW_ROUNDS, iterations=1)


@pytest.mark.cuda
@requires_cuda
def test_grow_mtseg_cuda(benchmark, runtime_info, grow_inputs):
    seeds, seg = grow_inputs
    out = _bench_mtseg_cuda(benchmark, runtime_info, "grow-hc18-32", "mtseg.grow_instances", N_GROW, "540x800",
                            mk.grow_instances, seeds.cuda(), seg.cuda(), LAM, lam=LAM)
    assert torch.equal(out.instances.cpu(), mk.grow_instances(seeds, seg, LAM).instances)
