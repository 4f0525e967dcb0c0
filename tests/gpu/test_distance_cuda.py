"""CUDA kernels of the distance operators against the CPU kernels (which are tested against scipy).

Skipped, with the reason, where there is no CUDA device or the extension was built
without its CUDA kernels. connected_components and grow_instances have no CUDA kernel:
they must raise NotImplementedError on CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import mtseg_kernels as mk

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape", [(3, 67, 91), (1, 512, 512), (2, 13, 40, 33)])
@pytest.mark.parametrize("spacing", [None, "aniso"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edt_matches_cpu(shape, spacing, dtype):
    torch.manual_seed(0)
    mask = torch.rand(shape) < 0.97
    sp = None if spacing is None else [0.5 + 0.7 * i for i in range(len(shape) - 1)]
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


@pytest.mark.parametrize("spacing", [None, (1.5, 0.5)])
def test_levelset_matches_cpu(spacing):
    rng = np.random.default_rng(0)
    seg = torch.from_numpy(ndi.binary_dilation(rng.random((4, 120, 150)) < 0.001, iterations=8))
    approx = seg & (torch.rand(seg.shape) < 0.02)
    for lam in (0.0, 0.5, 1.0, 3.0):
        cpu = mk.levelset_grow(approx, seg, lam, spacing)
        gpu = mk.levelset_grow(approx.cuda(), seg.cuda(), lam, spacing)
        assert torch.equal(gpu.cpu(), cpu)


def test_surface_metrics_on_gpu():
    rng = np.random.default_rng(1)
    p = torch.from_numpy(ndi.binary_dilation(rng.random((3, 64, 64)) < 0.002, iterations=4))
    t = torch.from_numpy(ndi.binary_dilation(rng.random((3, 64, 64)) < 0.002, iterations=4))
    cpu = mk.surface_metrics(p, t, (1.0, 0.5))
    gpu = mk.surface_metrics(p.cuda(), t.cuda(), (1.0, 0.5))
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


def test_cpu_only_ops_raise_on_gpu():
    m = torch.ones(1, 4, 4, device="cuda", dtype=torch.int64)
    with pytest.raises(NotImplementedError, match="CPU"):
        mk.connected_components(m)
    with pytest.raises(NotImplementedError, match="CPU"):
        mk.grow_instances(m, m, 1.0)
    with pytest.raises(NotImplementedError, match="cpu"):
        torch.ops.mtseg.connected_components(m, 4)


def test_opcheck_cuda():
    mask = torch.rand(2, 9, 13, device="cuda") < 0.8
    torch.library.opcheck(torch.ops.mtseg.edt.default, (mask, [1.0, 2.0], False, True, torch.float64))
    torch.library.opcheck(torch.ops.mtseg.levelset_grow.default, (mask, mask, 1.0, None))
