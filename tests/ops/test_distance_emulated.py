"""The CUDA distance kernels, run on the CPU by their emulation, against scipy and the CPU operators.

``torch.ops.mtseg._*_emulated`` run the launch sequence of ``csrc/cuda/distance.cu`` and
its kernel bodies (``csrc/include/mtseg/components.h``, ``distance_lines.h``) with every
launch replaced by serial loops over threads, warps and lanes. ``schedule`` replays
orders a GPU may produce: 0 in order, 1 reversed, 2 random permutations (threads, warps,
lanes), 3 random permutations and the union-find steps of all threads interleaved one
memory access at a time (the races of concurrent unions). Whatever the schedule, the
result must be scipy's (connected components) and bitwise the CPU operator's (which is
tested against scipy in ``test_distance.py``; the two share only the per-line envelope
of ``mtseg/distance.h``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_testing import cadis_label_maps, hc18_masks
from scipy import ndimage as ndi

import mtseg_kernels as mk

SCHEDULES = [0, 1, 2, 3]
STRUCTURES = {4: (2, 1), 8: (2, 2), 6: (3, 1), 18: (3, 2), 26: (3, 3)}


def cc_emulated(mask, connectivity, schedule=0, seed=0):
    return torch.ops.mtseg._connected_components_emulated(torch.as_tensor(mask), connectivity, schedule, seed)


def assert_scipy_labels(mask, connectivity, schedule, seed=0):
    labels, counts = cc_emulated(mask, connectivity, schedule, seed)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int64
    assert labels.shape == mask.shape and counts.shape == (mask.shape[0],)
    rank, order = STRUCTURES[connectivity]
    for i, m in enumerate(np.asarray(mask) != 0):
        ref, n = ndi.label(m, ndi.generate_binary_structure(rank, order))
        np.testing.assert_array_equal(labels[i].numpy(), ref, err_msg=f"image {i}, schedule {schedule}")
        assert counts[i].item() == n


# --------------------------------------------------------------------------------------
# connected components
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("connectivity", [4, 8, 6, 18, 26])
def test_components_random_masks(connectivity, schedule):
    """Densities around the percolation thresholds (long, branching components that merge
    late); widths that are not multiples of 32 and span several warp segments."""
    rng = np.random.default_rng(100 * connectivity + schedule)
    shapes = [(2, 23, 70), (3, 5, 33)] if connectivity in (4, 8) else [(2, 6, 9, 70), (1, 4, 3, 33)]
    for shape in shapes:
        for p in (0.25, 0.5, 0.6, 0.75, 0.97):
            assert_scipy_labels(rng.random(shape) < p, connectivity, schedule, seed=int(p * 100))


def comb(height, width, teeth_every=3):
    """Vertical teeth joined only by the last row: every tooth is its own component until
    the bottom, so roots of many segments and rows must merge in the end."""
    m = np.zeros((height, width), bool)
    m[:, ::teeth_every] = True
    m[-1] = True
    return m


def snake(height, width):
    """One path through every other row, turning at alternate ends: a single component
    whose union-find tree must cross every warp segment of every row."""
    m = np.zeros((height, width), bool)
    m[::2] = True
    for r in range(1, height, 2):
        m[r, -1 if (r // 2) % 2 == 0 else 0] = True
    return m


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_components_adversarial_shapes(schedule):
    shapes = np.stack([comb(40, 130), snake(40, 130), np.eye(40, 130, dtype=bool) | np.eye(40, 130, 64, dtype=bool),
                       ~comb(40, 130, 2)])
    for connectivity in (4, 8):
        assert_scipy_labels(shapes, connectivity, schedule, seed=7)
    vol = np.stack([comb(40, 130)] * 3)[None]
    vol[0, 1] = False
    vol[0, 1, 5, 64] = True  # the only link between slices 0 and 2
    for connectivity in (6, 18, 26):
        assert_scipy_labels(vol, connectivity, schedule, seed=9)


@pytest.mark.parametrize("schedule", [0, 3])
def test_components_real_masks(shared_data, schedule):
    labels = cadis_label_maps(shared_data, 2)
    masks = np.concatenate([labels == c for c in (3, 4, 7)])
    for connectivity in (4, 8):
        assert_scipy_labels(masks, connectivity, schedule, seed=11)
    heads, _ = hc18_masks(shared_data, 2)
    rings = heads & ~ndi.binary_erosion(heads, iterations=3)  # thin closed curves
    assert_scipy_labels(rings, 4, schedule)
    volume = np.stack([labels[0] == c for c in (3, 4, 5, 7)])[None, :, ::4, ::4]
    for connectivity in (6, 26):
        assert_scipy_labels(volume, connectivity, schedule)


def test_components_match_cpu_operator_and_edge_cases():
    rng = np.random.default_rng(5)
    mask = torch.from_numpy(rng.random((4, 31, 65)) < 0.6)
    cpu = mk.connected_components(mask, 8)
    emu = cc_emulated(mask, 8, 2, 1)
    assert torch.equal(cpu[0], emu[0]) and torch.equal(cpu[1], emu[1])
    labels, counts = cc_emulated(torch.zeros(2, 5, 5, dtype=torch.bool), 4)
    assert (labels == 0).all() and counts.tolist() == [0, 0]
    labels, counts = cc_emulated(torch.ones(1, 3, 4, 5), 6)
    assert (labels == 1).all() and counts.tolist() == [1]
    eye = torch.eye(6, dtype=torch.bool)[None]
    assert cc_emulated(eye, 4)[1].item() == 6 and cc_emulated(eye, 8)[1].item() == 1
    for shape in [(0, 4, 4), (2, 0, 4), (1, 3, 0, 2)]:
        labels, counts = cc_emulated(torch.ones(shape, dtype=torch.bool), 4 if len(shape) == 3 else 6)
        assert labels.shape == shape and counts.shape == (shape[0],) and (counts == 0).all()
    # every non-zero byte is foreground, also in a non-canonical bool (value 2)
    raw = torch.zeros(1, 3, 6, dtype=torch.uint8)
    raw[0, 1, 1:5] = torch.tensor([1, 2, 2, 1], dtype=torch.uint8)
    labels, counts = cc_emulated(raw.view(torch.bool), 4)
    assert counts.item() == 1 and (labels[0, 1, 1:5] == 1).all()
    labels, counts = cc_emulated(torch.tensor([[[1.0, 0.0, -2.5, 0.5]]]), 4)
    assert labels.tolist() == [[[1, 0, 2, 2]]] and counts.item() == 2
    with pytest.raises(ValueError, match="must be 4 or 8"):
        cc_emulated(mask, 6)
    with pytest.raises(ValueError, match="schedule"):
        cc_emulated(mask, 4, 7)


# --------------------------------------------------------------------------------------
# edt
# --------------------------------------------------------------------------------------
def edt_emulated(mask, spacing=None, squared=False, signed=False, dtype=None, schedule=0, seed=0):
    return torch.ops.mtseg._edt_emulated(torch.as_tensor(mask), spacing, squared, signed, dtype, schedule, seed)


@pytest.mark.parametrize("shape", [(3, 37, 70), (2, 9, 13, 40), (1, 1, 1), (2, 1, 50), (1, 45, 1), (1, 3, 1, 7)])
@pytest.mark.parametrize("spacing", [None, "non-dyadic", "isotropic", "uneven"])
def test_edt_bitwise_equal_to_cpu(shape, spacing):
    """Same roundings as the CPU kernel, also with spacing that is not a power of two:
    isotropic spacing works in voxel units and is applied once at the end; spacing whose
    smallest step is below 2^-40 of the largest works in double also for float32 output."""
    rng = np.random.default_rng(len(shape) * 7 + shape[-1])
    sp = {
        None: None,
        "non-dyadic": [0.7, 1.3, 1.9],
        "isotropic": [0.069] * 3,
        "uneven": [1.3, 0.7 * 2.0**-41, 1.1],
    }[spacing]
    sp = None if sp is None else sp[: len(shape) - 1]
    for p in (0.5, 0.9, 0.995):
        mask = torch.from_numpy(rng.random(shape) < p)
        for dtype in (torch.float32, torch.float64):
            for squared, signed in ((False, False), (True, False), (False, True)):
                cpu = mk.edt(mask, sp, squared, signed, dtype)
                emu = edt_emulated(mask, sp, squared, signed, dtype, schedule=int(p * 10) % 4, seed=3)
                assert emu.dtype == cpu.dtype
                assert torch.equal(emu, cpu), (shape, sp, p, dtype, squared, signed)


def test_edt_matches_scipy_and_special_masks():
    rng = np.random.default_rng(2)
    mask = rng.random((2, 8, 21, 34)) < 0.97
    sp = (1.5, 0.9375, 0.9375)
    got = edt_emulated(mask, sp, schedule=2)
    for i in range(2):
        np.testing.assert_allclose(got[i].numpy(), ndi.distance_transform_edt(mask[i], sampling=sp), rtol=0, atol=1e-4)
    assert torch.isinf(edt_emulated(torch.ones(2, 5, 7))).all()
    assert (edt_emulated(torch.zeros(1, 5, 7)) == 0).all()
    assert edt_emulated(torch.zeros(0, 5, 7)).shape == (0, 5, 7)
    # non-canonical bool: a byte 2 is foreground like 1
    raw = torch.zeros(1, 1, 5, dtype=torch.uint8)
    raw[0, 0, 1:4] = torch.tensor([2, 1, 2], dtype=torch.uint8)
    assert edt_emulated(raw.view(torch.bool)).tolist() == [[[0.0, 1.0, 2.0, 1.0, 0.0]]]
    # float64 output of a large image keeps integer squared distances exact
    line = torch.zeros(1, 1, 5000, dtype=torch.bool)
    line[0, 0, 1:] = True
    d = edt_emulated(line, squared=True, dtype=torch.float64)
    assert torch.equal(d[0, 0], torch.arange(5000, dtype=torch.float64) ** 2)


def test_edt_real_hc18_with_pixel_spacing(shared_data):
    masks, pixel = hc18_masks(shared_data, 2)
    for i in range(2):
        m = torch.from_numpy(masks[i : i + 1])
        sp = (pixel[i], pixel[i])
        for dtype in (torch.float32, torch.float64):
            assert torch.equal(edt_emulated(m, sp, dtype=dtype, schedule=2), mk.edt(m, sp, dtype=dtype))
        assert torch.equal(edt_emulated(m, signed=True), mk.edt(m, signed=True))


# --------------------------------------------------------------------------------------
# levelset_grow
# --------------------------------------------------------------------------------------
def levelset_emulated(approx, seg, lam, spacing=None, schedule=0, seed=0):
    return torch.ops.mtseg._levelset_grow_emulated(torch.as_tensor(approx), torch.as_tensor(seg), lam, spacing,
                                                   schedule, seed)


def growth_case(rng, shape, n_blobs=5):
    seg = ndi.binary_dilation(rng.random(shape) < n_blobs / np.prod(shape[1:]), iterations=4)
    approx = seg & (rng.random(shape) < 0.03)
    approx[0, 0, 0] = True  # a piece of A outside S
    return approx, seg


@pytest.mark.parametrize("spacing", [None, (1.5, 0.5), (0.7, 1.3), (0.069, 0.069), (0.3, 0.3 * 2.0**-41)])
def test_levelset_equal_to_cpu(spacing):
    rng = np.random.default_rng(8)
    approx, seg = growth_case(rng, (4, 40, 57))
    approx[2] = False  # an image without A
    seg[3] = False  # an image without S
    a, s = torch.from_numpy(approx), torch.from_numpy(seg)
    for k, lam in enumerate((0.0, 0.5, 1.0, 3.0, 1e6)):
        assert torch.equal(levelset_emulated(a, s, lam, spacing, schedule=k % 4, seed=k), mk.levelset_grow(a, s, lam, spacing))


def test_levelset_3d_and_real_hc18(shared_data):
    rng = np.random.default_rng(4)
    approx, seg = growth_case(rng, (2, 9, 20, 23))
    for spacing in (None, (2.0, 0.7, 0.7)):
        for lam in (0.5, 2.0):
            a, s = torch.from_numpy(approx), torch.from_numpy(seg)
            assert torch.equal(levelset_emulated(a, s, lam, spacing, 2, 1), mk.levelset_grow(a, s, lam, spacing))
    masks, pixel = hc18_masks(shared_data, 2)
    approx = torch.from_numpy(ndi.binary_erosion(masks, np.ones((1, 31, 31), bool)))
    seg = torch.from_numpy(ndi.binary_dilation(masks, np.ones((1, 11, 11), bool)))
    for spacing in (None, (pixel[0], pixel[0])):
        assert torch.equal(levelset_emulated(approx, seg, 1.0, spacing, 2), mk.levelset_grow(approx, seg, 1.0, spacing))


# --------------------------------------------------------------------------------------
# grow_instances
# --------------------------------------------------------------------------------------
def grow_emulated(seeds, seg, lam, spacing=None, connectivity=0, schedule=0, seed=0, arena_budget=0):
    return torch.ops.mtseg._grow_instances_emulated(torch.as_tensor(seeds), torch.as_tensor(seg), lam, spacing,
                                                    connectivity, schedule, seed, arena_budget)


def instance_case(rng, shape, blobs=6, seed_p=0.01):
    seg = ndi.binary_dilation(rng.random(shape) < blobs / np.prod(shape[1:]), iterations=5)
    seed_mask = seg & (rng.random(shape) < seed_p)
    seeds = np.stack([ndi.label(m)[0] * 3 for m in seed_mask]).astype(np.int64)  # ids 3, 6, ... (gaps)
    seeds[0][rng.random(shape[1:]) < 0.001] = 1000  # one id scattered over the image, also outside S
    return seeds, seg


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grow_instances_equal_to_cpu_2d(schedule):
    rng = np.random.default_rng(20 + schedule)
    seeds, seg = instance_case(rng, (3, 44, 70))
    seeds[2] = 0  # an image without seeds
    s, g = torch.from_numpy(seeds), torch.from_numpy(seg)
    for k, lam in enumerate((0.0, 0.5, 1.0, 2.5, 1e6)):
        for spacing, conn in ((None, 4), (None, 8), ((0.7, 1.3), 8), ((1.5, 0.5), 4), ((0.069, 0.069), 8)):
            cpu = mk.grow_instances(s, g, lam, spacing, conn).instances
            # budget 0: all seeds in one round (as on a GPU here); 1 and 500 voxels: one
            # seed a round, and rounds of several seeds that do not start at task 0
            budget = (0, 1, 500, 0)[schedule]
            emu = grow_emulated(s, g, lam, spacing, conn, schedule, seed=k, arena_budget=budget)
            assert torch.equal(emu, cpu), (lam, spacing, conn)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_grow_instances_equal_to_cpu_3d(connectivity):
    rng = np.random.default_rng(connectivity)
    seeds, seg = instance_case(rng, (2, 8, 22, 25), seed_p=0.02)
    s, g = torch.from_numpy(seeds), torch.from_numpy(seg)
    for lam in (0.5, 2.0):
        for spacing in (None, (2.0, 0.7, 1.1)):
            cpu = mk.grow_instances(s, g, lam, spacing, connectivity).instances
            assert torch.equal(grow_emulated(s, g, lam, spacing, connectivity, 3, 5), cpu)


def test_grow_instances_hand_made_cases():
    """Independent of the CPU operator: a bar touched by two seeds is cut at the mid-line
    (the tie column goes to the seed the feature transform meets first)."""
    seg = np.zeros((1, 9, 41), bool)
    seg[0, 2:7, :] = True
    seeds = np.zeros(seg.shape, np.int64)
    seeds[0, 4, 5] = 1
    seeds[0, 4, 25] = 2
    for schedule in SCHEDULES:
        got = grow_emulated(seeds, seg, 1e6, schedule=schedule).numpy()[0]
        assert (got[2:7, :16] == 1).all() and (got[2:7, 16:] == 2).all()
        assert (got[:2] == 0).all() and (got[7:] == 0).all()
    # one seed: the single-object rule, written out with scipy
    rng = np.random.default_rng(6)
    _, seg2 = instance_case(rng, (1, 30, 40))
    a = seg2 & (rng.random(seg2.shape) < 0.02)
    for lam in (0.5, 1.5):
        phi = ndi.distance_transform_edt(~a[0]) - lam * ndi.distance_transform_edt(seg2[0])
        expected = np.where(a[0] | (seg2[0] & (phi <= 0)), 7, 0)
        np.testing.assert_array_equal(grow_emulated(a.astype(np.int64) * 7, seg2, lam).numpy()[0], expected)


def test_grow_instances_edge_cases_and_errors():
    s = torch.ones(1, 5, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=">= 0"):
        grow_emulated(-s, s, 1.0)
    with pytest.raises(TypeError, match="integer"):
        grow_emulated(torch.ones(1, 5, 5), s, 1.0)
    with pytest.raises(ValueError, match="connectivity"):
        grow_emulated(s, s, 1.0, connectivity=6)
    assert grow_emulated(torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, 4, 4), 1.0).shape == (0, 4, 4)
    assert (grow_emulated(torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4), 1.0) == 0).all()
    # bool seeds are seed 1, whatever the byte
    raw = torch.zeros(1, 4, 4, dtype=torch.uint8)
    raw[0, 1, 1] = 2
    got = grow_emulated(raw.view(torch.bool), torch.ones(1, 4, 4), 1e6)
    assert (got == 1).all()
    # huge ids do not size anything
    big = torch.zeros(1, 6, 6, dtype=torch.int64)
    big[0, 0, 0], big[0, 5, 5] = 2**62, 2**40
    got = grow_emulated(big, torch.ones(1, 6, 6), 1e6)
    assert got[0, 0, 0] == 2**62 and got[0, 5, 5] == 2**40 and set(got.unique().tolist()) == {2**62, 2**40}


LIMIT = 2.0**500  # the largest ratio of spacings any distance operator accepts


def same_outcome(cpu, emulated):
    """Runs both; both raise the same ValueError, or both return bitwise-equal tensors."""
    try:
        expected = cpu()
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            emulated()
        assert str(got.value).splitlines()[0] == str(e).splitlines()[0]
        return None
    got = emulated()
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    return got


def test_hostile_spacing_and_layouts():
    """Spacings whose ratio exceeds 2^500 are refused by every path alike (issue 15's
    grow_instances reproducer, spacing (1e300, 1), overflowed); up to that ratio the
    emulated GPU kernels give the CPU's results bitwise. Strided inputs are read as
    their values."""
    s = torch.zeros(2, 8, 8, dtype=torch.long)
    s[0, -1, -1] = 10**9
    s[1, 0, 0] = 1
    g = torch.ones(2, 8, 8, dtype=torch.bool)
    g[1, :, 3] = False
    mask = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.7
    approx = mask & ~mask.roll(1, 1)
    above = float(np.nextafter(LIMIT, np.inf))
    for sp in ([1e300, 1.0], [1e-300, 3.0], [above, 1.0], [1.0, 1.0 / above]):
        for call in (
            lambda: grow_emulated(s, g, 1.0, sp, schedule=2),
            lambda: mk.grow_instances(s, g, 1.0, sp),
            lambda: edt_emulated(mask, sp, dtype=torch.float64),
            lambda: mk.edt(mask, sp, dtype=torch.float64),
            lambda: levelset_emulated(approx, mask, 2.0, sp),
            lambda: mk.levelset_grow(approx, mask, 2.0, sp),
        ):
            with pytest.raises(ValueError, match="differ by too much"):
                call()
    # at and near the limit: the CPU's results (or its range error for float32 edt)
    for sp in ([LIMIT, 1.0], [1.0, 1.0 / LIMIT], [1e150, 0.7], [3.0, 1e-140], [1e-160, 1e-160 * LIMIT / 3]):
        for schedule in SCHEDULES:
            got = same_outcome(lambda: mk.grow_instances(s, g, 1.0, sp).instances,
                               lambda: grow_emulated(s, g, 1.0, sp, schedule=schedule))
            assert (got[s > 0] == s[s > 0]).all()
            assert ((got > 0) <= (g | (s > 0))).all()
        same_outcome(lambda: mk.levelset_grow(approx, mask, 2.0, sp),
                     lambda: levelset_emulated(approx, mask, 2.0, sp, schedule=1))
        for dtype in (torch.float32, torch.float64):
            for squared, signed in ((False, False), (True, False), (False, True)):
                same_outcome(lambda: mk.edt(mask, sp, squared, signed, dtype),
                             lambda: edt_emulated(mask, sp, squared, signed, dtype, schedule=3, seed=1))
    view = (torch.rand(3, 40, 70, generator=torch.Generator().manual_seed(1)) < 0.6).transpose(1, 2)[:, ::2]
    assert torch.equal(cc_emulated(view, 8)[0], mk.connected_components(view.contiguous(), 8)[0])
    assert torch.equal(edt_emulated(view, [0.7, 1.3]), mk.edt(view.contiguous(), [0.7, 1.3]))


def test_emulated_ops_opcheck():
    """Schemas, meta kernels (FakeTensor) and dispatch of the private operators."""
    rng = np.random.default_rng(12)
    mask = torch.from_numpy(rng.random((2, 9, 13)) < 0.7)
    seeds = torch.from_numpy(rng.random((2, 9, 13)) < 0.05).long() * 3
    torch.library.opcheck(torch.ops.mtseg._edt_emulated.default, (mask, [1.0, 0.7], False, True, torch.float64, 2, 1))
    torch.library.opcheck(torch.ops.mtseg._connected_components_emulated.default, (mask, 8, 3, 1))
    torch.library.opcheck(torch.ops.mtseg._levelset_grow_emulated.default, (mask & (seeds > 0), mask, 1.0, None, 1, 0))
    torch.library.opcheck(torch.ops.mtseg._grow_instances_emulated.default, (seeds, mask, 1.0, None, 8, 2, 3, 0))
