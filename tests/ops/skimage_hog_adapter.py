"""pytest plugin used by test_hog.py::test_scikit_image_suite_against_mtseg: before
scikit-image's own test_hog.py runs, `skimage.feature.hog` (which that file calls as
`feature.hog`) is replaced by an adapter around mtseg_kernels.hog."""

import skimage.feature


def pytest_configure(config):
    from test_hog import mtseg_as_skimage_hog

    skimage.feature.hog = mtseg_as_skimage_hog
