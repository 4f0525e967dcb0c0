"""Shared fixtures: devices, dtypes, the CUDA marker, real data.

Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why it happens here, at the top.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") is None:
    import ctypes.util

    # Cheap test for a CUDA driver before torch is imported (torch may import triton).
    if ctypes.util.find_library("cuda") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import mtseg_kernels  # noqa: E402,F401  (registers torch.ops.mtseg)

HAS_CUDA = torch.cuda.is_available() and mtseg_kernels.backends()["cuda_compiled"]
NO_CUDA_REASON = (
    "no CUDA device on this machine"
    if not torch.cuda.is_available()
    else "the extension was built without its CUDA kernels"
)

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped, with the reason, where there is none)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device; the CUDA case skips with a reason where there is none."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def shared_data_dir() -> Path | None:
    """The real-data folder, if present: ``$MTSEG_SHARED_DATA``, else a ``shared/data``
    folder beside the checkout (where the project's CI keeps it). Its layout is described
    in docs/testing.md."""
    env = os.environ.get("MTSEG_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip with a reason when absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set MTSEG_SHARED_DATA to a real-data folder (layout: docs/testing.md)")
    return path
