"""connected_components on the CPU against scipy.ndimage.label and cc3d: exact labels (1..n
in raster order of their first voxel), every connectivity, 2D and 3D, batches, widths
around the 64-voxel words the labelling works in, real masks, one and two threads, and
inputs large enough for the parallel path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

import mtseg_kernels as mk

from distance_testing import cadis_label_maps, hc18_masks

cc3d = pytest.importorskip(
    "cc3d", reason="cc3d (connected-components-3d, pinned in requirements-ci.txt) is not installed"
)

STRUCTURES = {4: (2, 1), 8: (2, 2), 6: (3, 1), 18: (3, 2), 26: (3, 3)}
CONNECTIVITIES_2D, CONNECTIVITIES_3D = (4, 8), (6, 18, 26)
PARALLEL_VOXELS = 1 << 22  # batches of at least this many voxels are labelled in parallel


def raster_order(labels: np.ndarray) -> np.ndarray:
    """`labels` renumbered 1..n in raster order of each label's first voxel (0 stays 0)."""
    flat = labels.ravel()
    values, first = np.unique(flat, return_index=True)
    keep = values != 0
    values, first = values[keep], first[keep]
    lut = np.zeros(int(flat.max()) + 1 if flat.size else 1, dtype=np.int64)
    lut[values[np.argsort(first)]] = np.arange(1, len(values) + 1)
    return lut[labels]


def cc3d_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    # uint8, not bool: cc3d 4.1.1 labels background pixels of some bool masks with
    # connectivity 8 (e.g. numpy seed 11, random((3, 7, 63)) < 0.05, image 1, pixel (2, 0))
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity, return_N=True)
    return raster_order(labels), n


def references(mask: np.ndarray, connectivity: int) -> list[tuple[np.ndarray, int]]:
    """(labels, count) of one image from scipy and from cc3d, both renumbered."""
    rank, order = STRUCTURES[connectivity]
    ref_scipy, n_scipy = ndi.label(mask, ndi.generate_binary_structure(rank, order))
    return [(raster_order(ref_scipy), n_scipy), cc3d_labels(mask, connectivity)]


def assert_matches_peers(masks: np.ndarray, connectivity: int, peers: bool = True) -> None:
    labels, counts = mk.connected_components(torch.from_numpy(np.ascontiguousarray(masks)), connectivity)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int64
    assert labels.shape == masks.shape and counts.shape == (len(masks),)
    for i, m in enumerate(masks):
        got = labels[i].numpy()
        refs = references(m, connectivity) if peers else [cc3d_labels(m, connectivity)]
        for ref, n in refs:
            np.testing.assert_array_equal(got, ref)
            assert counts[i].item() == n


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_raster_order_oracle():
    # the oracle itself on a hand-made case: labels 7, 3, 5 first seen in that order
    np.testing.assert_array_equal(raster_order(np.array([[0, 7, 7], [3, 0, 5], [3, 7, 0]])),
                                  [[0, 1, 1], [2, 0, 3], [2, 1, 0]])


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_2D + CONNECTIVITIES_3D)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.95]),
       width=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 130]))
def test_random_masks_match_scipy_and_cc3d(connectivity, seed, p, width):
    rng = np.random.default_rng(seed)
    shape = (3, 7, width) if connectivity in CONNECTIVITIES_2D else (2, 4, 5, width)
    assert_matches_peers(rng.random(shape) < p, connectivity)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_3D)
def test_word_boundaries_3d(connectivity):
    # components that meet only across bit 63 / bit 64 of a row, diagonally in y and z
    m = np.zeros((1, 3, 3, 130), dtype=bool)
    m[0, 0, 0, :64] = True  # run ending at x = 63
    m[0, 1, 1, 64:] = True  # (dz, dy, dx) = (1, 1, 1) from its last voxel: 26 only
    m[0, 2, 0, 64] = True  # (1, -1, 0) from x = 64 of the run above: 18 and 26
    m[0, 2, 2, 63] = True  # (1, 1, -1) from x = 64: 26 only
    m[0, 0, 2, 0] = True  # alone in every connectivity
    expected = {6: 5, 18: 4, 26: 2}[connectivity]
    labels, counts = mk.connected_components(torch.from_numpy(m), connectivity)
    assert counts.item() == expected
    assert_matches_peers(m, connectivity)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_2D)
def test_patterns_2d(connectivity):
    w = 131
    yy, xx = np.mgrid[:9, :w]
    patterns = np.stack([
        (yy + xx) % 2 == 0,  # checkerboard: the most runs; one component with 8, all single with 4
        np.ones((9, w), dtype=bool),
        (xx % 64 == 63) | (xx % 64 == 0),  # pairs straddling the word boundary
        xx == yy * 16,  # steps of 16: isolated
        np.eye(9, w, k=60, dtype=bool),  # diagonal crossing bit 63/64
    ])
    assert_matches_peers(patterns, connectivity)
    counts = mk.connected_components(torch.from_numpy(patterns), connectivity)[1]
    assert counts[0].item() == (1 if connectivity == 8 else int(patterns[0].sum()))
    assert counts[4].item() == (1 if connectivity == 8 else 9)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_3D)
def test_patterns_3d(connectivity):
    zz, yy, xx = np.mgrid[:5, :6, :70]
    patterns = np.stack([(zz + yy + xx) % 2 == 0, (zz + yy) % 2 == 0, np.ones((5, 6, 70), dtype=bool),
                         (xx == 63 + (zz % 2)) & (yy == zz)])
    assert_matches_peers(patterns, connectivity)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_2D)
def test_2d_threads_and_parallel_path(threads, connectivity):
    # 70 x 256 x 256 > 2^22 voxels: whole images handed out to the threads
    rng = np.random.default_rng(threads * 10 + connectivity)
    masks = ndi.binary_opening(rng.random((70, 256, 256)) < 0.55, np.ones((1, 2, 2)))
    assert masks.size >= PARALLEL_VOXELS
    assert_matches_peers(masks, connectivity, peers=False)
    assert_matches_peers(masks[:3], connectivity)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES_3D)
def test_3d_threads_and_parallel_path(threads, connectivity):
    rng = np.random.default_rng(threads * 100 + connectivity)
    masks = rng.random((2, 64, 182, 182)) < 0.3  # 2 volumes, >= 2^22 voxels in all
    masks[1] = ndi.binary_dilation(masks[1], iterations=1)
    assert masks.size >= PARALLEL_VOXELS
    assert_matches_peers(masks, connectivity, peers=False)
    assert_matches_peers(masks[:, :12], connectivity)


def test_same_labels_at_any_thread_count():
    rng = np.random.default_rng(5)
    masks = torch.from_numpy(rng.random((5, 40, 150, 150)) < 0.4)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(mk.connected_components(masks, 26))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_real_2d_masks(shared_data):
    heads, _ = hc18_masks(shared_data, 4)
    classes = cadis_label_maps(shared_data, 3)
    cadis = np.concatenate([classes == c for c in (0, 3, 4, 7)])
    for connectivity in CONNECTIVITIES_2D:
        assert_matches_peers(heads, connectivity)
        assert_matches_peers(cadis, connectivity)


def test_real_3d_masks(shared_data):
    nib = pytest.importorskip("nibabel", reason="nibabel (pinned in requirements-ci.txt) is not installed")
    files = sorted((shared_data / "brats18").glob("*/*/*_seg.nii.gz"))
    if not files:
        pytest.skip(f"real data not found: no BraTS segmentation (*_seg.nii.gz) under {shared_data / 'brats18'}")
    seg = np.asarray(nib.load(files[0]).dataobj)
    # the tumour's bounding box plus 3 voxels (the references are slow on the whole volume)
    box = tuple(slice(max(int(i.min()) - 3, 0), int(i.max()) + 4) for i in np.nonzero(seg))
    seg = seg[box]
    # every tumour class, the whole tumour, and the tumour cut by planes (more pieces)
    masks = np.stack([seg == 1, seg == 2, seg == 4, seg > 0, (seg > 0) & (np.arange(seg.shape[2]) % 7 != 0)])
    masks = np.ascontiguousarray(masks)
    assert masks.any(axis=(1, 2, 3)).all()
    for connectivity in CONNECTIVITIES_3D:
        assert_matches_peers(masks, connectivity)
