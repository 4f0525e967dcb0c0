"""Fidelity tests: the dataset fixture writers (tests/harness/data) on sys.path, a fresh index cache."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "data"))
REPO = HERE.parents[2]


@pytest.fixture(autouse=True)
def _fresh_index_cache():
    from mtseg_harness.data import SegmentationDataset

    SegmentationDataset.clear_memory_cache()
    yield
