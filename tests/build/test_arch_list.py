"""The default TORCH_CUDA_ARCH_LIST: the GPUs the installed torch was built for."""

from __future__ import annotations

import pytest
import torch

from build_testing import load_setup

NVCC_13 = {f"sm_{a}" for a in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)} | {
    f"compute_{a}" for a in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)
}


@pytest.fixture(scope="module")
def setup_py():
    return load_setup()


def test_torch_2_14_cuda_13_list(setup_py):
    # torch 2.14.1+cu130 reports these (no PTX): every one gets SASS, the newest also PTX.
    arches = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert setup_py.default_arch_list(arches, NVCC_13) == ("7.5;8.0;8.6;9.0;10.0;12.0+PTX", [])


def test_order_is_numeric_not_textual(setup_py):
    # "10.0" sorts after "9.0"; the newest architecture is 12.0, not 9.0.
    assert setup_py.default_arch_list(["sm_120", "sm_90", "sm_100"], None) == ("9.0;10.0;12.0+PTX", [])


def test_torch_ptx_entries_are_kept(setup_py):
    # A torch built with "...;9.0+PTX" lists compute_90: that arch carries PTX, no other.
    assert setup_py.default_arch_list(["sm_80", "sm_90", "compute_90"], None) == ("8.0;9.0+PTX", [])
    # PTX-only entry: its arch still needs to be in the list to carry it.
    assert setup_py.default_arch_list(["sm_80", "compute_86"], None) == ("8.0;8.6+PTX", [])


def test_arch_specific_variants(setup_py):
    assert setup_py.default_arch_list(["sm_90", "sm_90a"], None) == ("9.0;9.0a+PTX", [])


def test_arches_nvcc_cannot_build_are_dropped(setup_py):
    # An older toolkit (say CUDA 11.8) cannot build Blackwell: drop it, say so.
    nvcc_118 = {"sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"}
    got = setup_py.default_arch_list(["sm_70", "sm_80", "sm_90", "sm_100", "sm_120"], nvcc_118)
    assert got == ("7.0;8.0;9.0+PTX", ["sm_100", "sm_120"])


def test_nothing_buildable(setup_py):
    assert setup_py.default_arch_list([], NVCC_13) == (None, [])
    assert setup_py.default_arch_list(["sm_50"], NVCC_13) == (None, ["sm_50"])


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: it lists no GPU architectures")
def test_installed_torch_reports_arches_without_a_gpu(setup_py):
    # The default relies on this working on a machine without a GPU (like CI's).
    arches = torch.cuda.get_arch_list()
    assert arches and all(a.startswith(("sm_", "compute_")) for a in arches)
    arch_list, _ = setup_py.default_arch_list(arches, None)
    assert arch_list is not None and "+PTX" in arch_list
