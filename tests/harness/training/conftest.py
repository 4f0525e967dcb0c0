"""Fixtures of the trainer/methods/CLI tests (their shared helpers are in helpers.py).

The dataset fixture writers of the data tests (tests/harness/data/dataset_writers.py)
are reused through sys.path, unchanged.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))


@pytest.fixture(autouse=True)
def _one_thread_fresh_index():
    from mtseg_harness.data import SegmentationDataset

    SegmentationDataset.clear_memory_cache()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
