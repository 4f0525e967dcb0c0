"""CUDA kernels of the distance operators against the CPU kernels (which are tested against scipy).

Skipped, with the reason, where there is no CUDA device or the extension was built
without its CUDA kernels. The same kernel code runs without a GPU through its CPU
emulation (``tests/ops/test_distance_emulated.py``); these tests check the real launches:
results bitwise equal to the CPU's, no host synchronisation inside edt,
connected_components and levelset_grow (CUDA graph capture), the shared-memory and the
global-memory workspaces of the envelope pass, and devices other than the current one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_testing import cadis_label_maps, hc18_masks
from scipy import ndimage as ndi

import mtseg_kernels as mk

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape", [(3, 67, 91), (1, 512, 512), (2, 13, 40, 33), (1, 2, 5000)])
@pytest.mark.parametrize("spacing", [None, "aniso", "isotropic", "uneven"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edt_matches_cpu(shape, spacing, dtype):
    """(1, 2, 5000): lines too long for shared memory (the global-memory workspace).
    Isotropic spacing works in voxel units; "uneven" works in double for float32 too."""
    torch.manual_seed(0)
    mask = torch.rand(shape) < 0.97
    sp = {
        None: None,
        "aniso": [0.5, 1.2, 1.9],
        "isotropic": [0.069] * 3,
        "uneven": [1.3, 0.7 * 2.0**-41, 1.1],
    }[spacing]
    sp = None if sp is None else sp[: len(shape) - 1]
    for squared in (False, True):
        for signed in (False, True):
            cpu = mk.edt(mask, sp, squared, signed, dtype)
            gpu = mk.edt(mask.cuda(), sp, squared, signed, dtype)
            assert gpu.dtype == cpu.dtype and gpu.device.type == "cuda"
            # same math, same rounding (no fast math, intersections in double)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


def test_edt_special_and_strided_on_gpu():
    ones = torch.ones(2, 5, 7, device="cuda")
    assert torch.isinf(mk.edt(ones)).all()
    mask = torch.rand(3, 40, 60, device="cuda") < 0.9
    view = mask.transpose(1, 2)[:, ::2]
    torch.testing.assert_close(mk.edt(view).cpu(), mk.edt(view.cpu()), rtol=0, atol=0)
    raw = torch.zeros(1, 1, 5, dtype=torch.uint8, device="cuda")
    raw[0, 0, 1:4] = 2
    assert mk.edt(raw.view(torch.bool)).cpu().tolist() == [[[0.0, 1.0, 2.0, 1.0, 0.0]]]


def test_edt_real_hc18(shared_data):
    masks, pixel = hc18_masks(shared_data, 4)
    m = torch.from_numpy(masks)
    sp = (pixel[0], pixel[0])
    assert torch.equal(mk.edt(m.cuda(), sp).cpu(), mk.edt(m, sp))


@pytest.mark.parametrize("spacing", [None, (1.5, 0.5), (0.7, 1.3)])
def test_levelset_matches_cpu(spacing):
    rng = np.random.default_rng(0)
    seg = torch.from_numpy(ndi.binary_dilation(rng.random((4, 120, 150)) < 0.001, iterations=8))
    approx = seg & (torch.rand(seg.shape) < 0.02)
    approx[3] = False
    for lam in (0.0, 0.5, 1.0, 3.0):
        cpu = mk.levelset_grow(approx, seg, lam, spacing)
        gpu = mk.levelset_grow(approx.cuda(), seg.cuda(), lam, spacing)
        assert torch.equal(gpu.cpu(), cpu)


def test_levelset_real_hc18_3d(shared_data):
    masks, _ = hc18_masks(shared_data, 8)
    approx = torch.from_numpy(ndi.binary_erosion(masks, np.ones((1, 51, 51), bool)))
    seg = torch.from_numpy(ndi.binary_dilation(masks, np.ones((1, 21, 21), bool)))
    assert torch.equal(mk.levelset_grow(approx.cuda(), seg.cuda(), 1.0).cpu(), mk.levelset_grow(approx, seg, 1.0))
    vol_a, vol_s = approx[None, :, ::4, ::4], seg[None, :, ::4, ::4]
    got = mk.levelset_grow(vol_a.cuda(), vol_s.cuda(), 2.0, (3.0, 0.7, 0.7)).cpu()
    assert torch.equal(got, mk.levelset_grow(vol_a, vol_s, 2.0, (3.0, 0.7, 0.7)))


def test_surface_metrics_on_gpu():
    rng = np.random.default_rng(1)
    p = torch.from_numpy(ndi.binary_dilation(rng.random((3, 64, 64)) < 0.002, iterations=4))
    t = torch.from_numpy(ndi.binary_dilation(rng.random((3, 64, 64)) < 0.002, iterations=4))
    cpu = mk.surface_metrics(p, t, (1.0, 0.5))
    gpu = mk.surface_metrics(p.cuda(), t.cuda(), (1.0, 0.5))
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@pytest.mark.parametrize("connectivity", [4, 8, 6, 18, 26])
def test_components_match_cpu(connectivity):
    rng = np.random.default_rng(connectivity)
    shape = (4, 133, 301) if connectivity in (4, 8) else (2, 31, 47, 70)
    for p in (0.3, 0.55, 0.6, 0.9):
        mask = torch.from_numpy(rng.random(shape) < p)
        cpu = mk.connected_components(mask, connectivity)
        gpu = mk.connected_components(mask.cuda(), connectivity)
        assert gpu[0].device.type == "cuda" and gpu[0].dtype == torch.int32 and gpu[1].dtype == torch.int64
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_components_real_masks_and_repeatability(shared_data):
    labels = cadis_label_maps(shared_data, 4)
    masks = torch.from_numpy(np.concatenate([labels == c for c in (3, 4, 7)]))
    cpu = mk.connected_components(masks, 8)
    for _ in range(5):  # races differ between runs; the result must not
        gpu = mk.connected_components(masks.cuda(), 8)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def instance_case(rng, shape, blobs=8, seed_p=0.01):
    seg = ndi.binary_dilation(rng.random(shape) < blobs / np.prod(shape[1:]), iterations=5)
    seed_mask = seg & (rng.random(shape) < seed_p)
    seeds = np.stack([ndi.label(m)[0] * 3 for m in seed_mask]).astype(np.int64)
    seeds[0][rng.random(shape[1:]) < 0.001] = 1000
    return torch.from_numpy(seeds), torch.from_numpy(seg)


@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)])
def test_grow_instances_match_cpu(spacing):
    seeds, seg = instance_case(np.random.default_rng(0), (6, 96, 128))
    for lam in (0.0, 0.5, 2.0, 1e6):
        for conn in (4, 8):
            cpu = mk.grow_instances(seeds, seg, lam, spacing, conn)
            gpu = mk.grow_instances(seeds.cuda(), seg.cuda(), lam, spacing, conn)
            assert gpu.instances.device.type == "cuda"
            assert torch.equal(gpu.instances.cpu(), cpu.instances)
    seeds3, seg3 = instance_case(np.random.default_rng(1), (2, 12, 40, 44))
    for conn in (6, 26):
        cpu = mk.grow_instances(seeds3, seg3, 1.5, (2.0, 1.0, 1.0), conn).instances
        assert torch.equal(mk.grow_instances(seeds3.cuda(), seg3.cuda(), 1.5, (2.0, 1.0, 1.0), conn).instances.cpu(), cpu)


def test_ops_do_not_synchronise():
    """edt, connected_components and levelset_grow on bool masks never wait for the device."""
    mask = torch.rand(4, 64, 96, device="cuda") < 0.7
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mk.edt(mask)
        mk.edt(mask, (0.7, 1.3), signed=True, dtype=torch.float64)
        mk.connected_components(mask, 8)
        mk.levelset_grow(mask & (torch.rand_like(mask, dtype=torch.float32) < 0.1), mask, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture():
    mask = torch.rand(2, 3, 40, 50, device="cuda") < 0.8
    approx = mask & (torch.rand(mask.shape, device="cuda") < 0.05)
    expected = (mk.edt(mask), mk.connected_components(mask, 26), mk.levelset_grow(approx, mask, 1.5))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (mk.edt(mask), mk.connected_components(mask, 26), mk.levelset_grow(approx, mask, 1.5))
    mask.copy_(torch.rand(mask.shape, device="cuda") < 0.8)  # replay on new contents
    approx.copy_(mask & (torch.rand(mask.shape, device="cuda") < 0.05))
    expected = (mk.edt(mask), mk.connected_components(mask, 26), mk.levelset_grow(approx, mask, 1.5))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], expected[0])
    assert torch.equal(out[1][0], expected[1][0]) and torch.equal(out[1][1], expected[1][1])
    assert torch.equal(out[2], expected[2])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    mask = torch.rand(2, 30, 40) < 0.6
    on1 = mask.to("cuda:1")
    with torch.cuda.device(0):
        assert torch.equal(mk.edt(on1).cpu(), mk.edt(mask))
        got = mk.connected_components(on1, 8)
        assert got[0].device == on1.device and torch.equal(got[0].cpu(), mk.connected_components(mask, 8)[0])


def test_opcheck_cuda():
    mask = torch.rand(2, 9, 13, device="cuda") < 0.8
    torch.library.opcheck(torch.ops.mtseg.edt.default, (mask, [1.0, 2.0], False, True, torch.float64))
    torch.library.opcheck(torch.ops.mtseg.levelset_grow.default, (mask, mask, 1.0, None))
    torch.library.opcheck(torch.ops.mtseg.connected_components.default, (mask, 8))
    seeds = (torch.rand(2, 9, 13, device="cuda") < 0.1).long() * 4
    torch.library.opcheck(torch.ops.mtseg.grow_instances.default, (seeds, mask, 1.0, None, 8))


def test_mixed_devices_raise_clearly():
    """A raw call with one CPU and one CUDA argument reaches the CUDA kernel: the argument
    check must name the mismatch (not a guard or kernel failure)."""
    cpu = torch.ones(1, 6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.mtseg.levelset_grow(cpu, cpu.cuda(), 1.0)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.mtseg.grow_instances(cpu.long(), cpu.cuda(), 1.0)


def test_hostile_spacing_and_ids_on_gpu():
    """Issue 15's grow_instances reproducer (spacing (1e300, 1), which overflowed) is
    refused as on the CPU (ratio of spacings above 2^500); up to that ratio the results
    are the CPU's bitwise. Ids near 2^63: no crash, seeds keep their ids, growth stays
    inside seeds | S."""
    s = torch.zeros(2, 8, 8, dtype=torch.long)
    s[0, -1, -1] = 10**9
    s[1, 0, 0] = 2**62
    g = torch.ones(2, 8, 8, dtype=torch.bool)
    g[1, :, 3] = False
    mask = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.7
    approx = mask & ~mask.roll(1, 1)
    for sp in ([1e300, 1.0], [float(np.nextafter(2.0**500, np.inf)), 1.0]):
        with pytest.raises(ValueError, match="differ by too much"):
            torch.ops.mtseg.grow_instances(s.cuda(), g.cuda(), 1.0, sp)
        with pytest.raises(ValueError, match="differ by too much"):
            mk.edt(mask.cuda(), sp, dtype=torch.float64)
        with pytest.raises(ValueError, match="differ by too much"):
            mk.levelset_grow(approx.cuda(), mask.cuda(), 2.0, sp)
    for sp in ([2.0**500, 1.0], [1e150, 0.7], [3.0, 1e-140]):
        for _ in range(3):
            got = torch.ops.mtseg.grow_instances(s.cuda(), g.cuda(), 1.0, sp).cpu()
            assert torch.equal(got, torch.ops.mtseg.grow_instances(s, g, 1.0, sp))
            assert (got[s > 0] == s[s > 0]).all()
            assert ((got > 0) <= (g | (s > 0))).all()
            assert set(got.unique().tolist()) <= {0, 10**9, 2**62}
        assert torch.equal(mk.levelset_grow(approx.cuda(), mask.cuda(), 2.0, sp).cpu(),
                           mk.levelset_grow(approx, mask, 2.0, sp))
        for squared in (False, True):
            torch.testing.assert_close(mk.edt(mask.cuda(), sp, squared, dtype=torch.float64).cpu(),
                                       mk.edt(mask, sp, squared, dtype=torch.float64), rtol=0, atol=0)
