"""Small configurations of every registered model, shared by the model tests.

Each case: registry name, spatial dims, architecture kwargs (narrow widths so the CPU
tests stay fast) and the spatial size it accepts without padding. Sizes are chosen by
hand from the architectures' strides, not computed by the code under test.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch


class Case(NamedTuple):
    name: str
    spatial_dims: int
    kwargs: dict
    size: tuple  # a valid, non-square input size
    stride: int  # total in-plane stride (1: any size works)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.spatial_dims}d"


CASES = [
    Case("unet", 2, {"channels": (4, 8, 16)}, (16, 24), 4),
    Case("unet_bilinear", 2, {"channels": (4, 8, 16)}, (16, 24), 4),
    Case("u2net_lite", 2, {}, (32, 48), 1),
    Case("tdsnet", 2, {"channels": (4, 4, 8, 8, 8), "branch_channels": 4, "decoder_channels": 4}, (24, 40), 1),
    Case("cmunet", 2, {"channels": (4, 8, 16, 32, 64)}, (32, 48), 16),
    Case("unet", 3, {"channels": (4, 8, 16)}, (8, 12, 16), 4),
    Case("unet_bilinear", 3, {"channels": (4, 8, 16)}, (8, 12, 16), 4),
    Case("u2net_lite", 3, {}, (34, 20, 4), 1),  # deepest stage 2x1x1: batch norm needs >1 value
    Case("cmunet", 3, {"channels": (2, 4, 8)}, (8, 12, 16), 4),
    Case("unet3d_aniso", 3, {"channels": (4, 8, 16)}, (5, 16, 24), 4),
]
CASE_IDS = [c.id for c in CASES]


def heads_for(spatial_dims: int, which: str) -> dict:
    """Head sets: 'none', one head alone, or 'all' (hog only in 2D)."""
    allh = {"presence": True, "scene": 3, "approx": True}
    if spatial_dims == 2:
        allh["hog"] = True
    if which == "none":
        return {}
    if which == "all":
        return allh
    return {which: allh[which]} if which in allh else None


@pytest.fixture(autouse=True)
def single_thread():
    """Run the (tiny) model tests on one intra-op thread, then restore the setting.

    The test tensors are small: a second OpenMP thread buys nothing, and on a shared
    2-core machine a descheduled worker makes every op wait at the barrier (1 s steps
    instead of 5 ms). Import this fixture into a test module to use it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
