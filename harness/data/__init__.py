"""Dataset adapters, weak labels and batched augmentation of the mtseg harness.

>>> from mtseg_harness.data import create_dataset, collate, BatchAugment
>>> ds = create_dataset("cadis", "/data/CaDIS", split="train", task=2)       # doctest: +SKIP
>>> loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)  # doctest: +SKIP

Every adapter reads the unmodified official download (layout in each module's
docstring, summary in this folder's README); samples are dicts, see :mod:`.base`, which
also holds the scaffold the adapters share (folder walk, split selection, sample build).
"""

from .base import (BUILTIN_PREFIX, IGNORE_INDEX, GroupReport, ObjectMetrics, RegionMetrics, SegmentationDataset,
                   create_dataset, dataset_class, file_record, list_datasets, ratio_split, register_dataset,
                   resolve_root, table_split)
from .io import DatasetError, MissingFileError
from .cadis import CaDIS, cadis_lut
from .endovis import EndoVis2017, EndoVis2018, decode_colour_label, read_labels_json
from .brats import BraTS, brats_regions
from .refuge import REFUGE
from .glas import GlaS
from .hc18 import HC18
from .hc18_tiles import HC18Tiles, stitch
from .lits import LiTS
from .generic import ImageMaskFolder, NiftiPairs
from .weak import WeakLabels, make_weak_labels, read_weak_labels, strong_indices, weak_region
from .transforms import BatchAugment, collate, presence_from_mask
from .wrappers import DatasetWrapper, InMemory, first_sample

__all__ = [
    "BUILTIN_PREFIX", "IGNORE_INDEX", "GroupReport", "ObjectMetrics", "RegionMetrics", "SegmentationDataset",
    "create_dataset", "dataset_class", "file_record", "list_datasets", "ratio_split", "register_dataset",
    "resolve_root", "table_split",
    "DatasetError", "MissingFileError",
    "CaDIS", "cadis_lut", "EndoVis2017", "EndoVis2018", "decode_colour_label", "read_labels_json",
    "BraTS", "brats_regions", "REFUGE", "GlaS", "HC18", "HC18Tiles", "stitch", "LiTS", "ImageMaskFolder",
    "NiftiPairs", "WeakLabels", "make_weak_labels", "read_weak_labels", "strong_indices", "weak_region",
    "BatchAugment", "collate", "presence_from_mask",
    "DatasetWrapper", "InMemory", "first_sample",
]
