"""pytest plugin for test_hog.py::test_scikit_image_suite_against_mtseg: before
scikit-image's own test_hog.py is collected, `skimage.feature.hog` (which that file calls
as `feature.hog`) is replaced by `mtseg_as_skimage_hog`, a thin adapter around
mtseg_kernels.hog with skimage's signature."""

import numpy as np
import pytest
import skimage.feature
import torch

import mtseg_kernels as mk


def mtseg_as_skimage_hog(image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3), block_norm="L2-Hys",
                         visualize=False, transform_sqrt=False, feature_vector=True, *, channel_axis=None):
    """skimage.feature.hog's signature on top of mtseg_kernels.hog (no visualisation):
    image (H, W) or with a channel axis -> the (1, C, H, W) batch mtseg takes."""
    if visualize:
        pytest.skip("mtseg_kernels.hog has no visualize=True")
    image = np.atleast_2d(np.asarray(image))
    if image.ndim - (channel_axis is not None) != 2:
        raise ValueError(f"only images with two spatial dimensions are supported, got shape {image.shape} "
                         f"with channel_axis={channel_axis}")
    chw = image[None] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
    batch = torch.from_numpy(np.ascontiguousarray(chw))[None]
    out = mk.hog(batch, orientations, tuple(pixels_per_cell), tuple(cells_per_block), block_norm, transform_sqrt,
                 feature_vector=False)[0].numpy()
    return out.ravel() if feature_vector else out


def pytest_configure(config):
    skimage.feature.hog = mtseg_as_skimage_hog
