"""The recursive method's label growth on CUDA: same classes as on the CPU, result on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtseg_harness.methods.recursive import grow

pytestmark = pytest.mark.cuda


def test_grow_on_cuda_equals_cpu_and_stays_on_the_device():
    yy, xx = np.mgrid[:48, :64]
    seg = torch.from_numpy(((yy - 20) ** 2 + (xx - 18) ** 2 <= 100) | ((yy - 24) ** 2 + (xx - 46) ** 2 <= 120)).long()
    seeds = torch.zeros(2, 48, 64, dtype=torch.long)
    seeds[:, 19:22, 17:20] = 1
    seeds[0, 23:26, 45:48] = 2
    seg = seg.expand(2, -1, -1).contiguous()
    want = grow(seeds, None, seg, 0.7)
    got = grow(seeds.cuda(), None, seg.cuda(), 0.7)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)
