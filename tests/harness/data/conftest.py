"""Makes the fixture writers (dataset_writers.py) importable from the data tests."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _fresh_index_cache():
    """Each test writes its own tiny dataset: start from an empty in-memory index cache."""
    from mtseg_harness.data import SegmentationDataset

    SegmentationDataset.clear_memory_cache()
    yield
