"""Training-step cost of each auxiliary method against the baseline step, and HOG targets
computed in the step (mtseg) against the published approach (skimage in the data loader).

Groups:

* ``train-step-unet-256``: one full training step of a UNet (base width 32, depth 4,
  batch 4, 1 x 256 x 256, 2 classes) on the CPU -- auxiliary labels on the device +
  forward + loss + backward + Adam step -- for ``baseline`` (CE, role ``mtseg``: the
  reference of the ratio column, so there the ratio reads baseline / method) and the
  methods ``hog_mtl`` (504-value HOG targets, one HOG head), ``tdsnet`` (presence,
  class BCE, fused sync loss) and ``cmunet`` (presence, Dice + focal).
* ``aux-labels-256``: the auxiliary labels alone for the same batch (what a method adds
  before the forward): HOG-MTL targets, presence from labels.
* ``hog-targets-8x256``: HOG-MTL targets (resize to 128 x 64, 6 orientations, 16 x 16
  cells, 2 x 2 blocks, L2-Hys) for 8 augmented 256 x 256 images: ``mtseg`` in the step
  (one batched call) vs ``skimage`` per image as a DataLoader would do it
  (``skimage.transform.resize`` with anti-aliasing + ``skimage.feature.hog``).

Synthetic images: a random filled ellipse (the mask) plus noise, fixed seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.feature import hog as skimage_hog
from skimage.transform import resize as skimage_resize

import mtseg_kernels
from mtseg_harness.runs.bench import StepRunner, synthetic_batch

SIZE = (256, 256)
BATCH = 4
MODEL_OPTIONS = {"base_channels": 32}
ROUNDS = 3


def _describe(benchmark, runtime_info, group, contestant, role, n_images, **extra):
    benchmark.group = group
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(contestant=contestant, role=role, device="cpu", input_dtype="torch.float32",
                                n_images=n_images, channels=1, image_size=f"{SIZE[0]}x{SIZE[1]}", **extra)


@pytest.fixture(scope="module", params=["baseline", "hog_mtl", "tdsnet", "cmunet"])
def runner(request):
    return StepRunner(request.param, "unet", size=SIZE, batch=BATCH, model_options=MODEL_OPTIONS)


def test_train_step(benchmark, runtime_info, runner):
    name = runner.method.name
    _describe(benchmark, runtime_info, "train-step-unet-256", f"{name} step", "mtseg" if name == "baseline" else "method",
              BATCH, model="unet base 32", heads=str(runner.method.heads()))
    runner.run()  # warm-up
    benchmark.pedantic(runner.run, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("name", ["hog_mtl", "tdsnet"])
def test_aux_labels(benchmark, runtime_info, name):
    r = StepRunner(name, "unet", size=SIZE, batch=BATCH, model_options={"base_channels": 4, "depth": 1})
    _describe(benchmark, runtime_info, "aux-labels-256", f"{name} labels (mtseg, in step)", "mtseg", BATCH)
    r.aux()
    benchmark(r.aux)


@pytest.fixture(scope="module")
def augmented():
    return synthetic_batch(8, SIZE, seed=1)["image"]


def test_hog_targets_mtseg_in_step(benchmark, runtime_info, augmented):
    _describe(benchmark, runtime_info, "hog-targets-8x256", "mtseg hog_pseudo_label (batched, in step)", "mtseg", 8)
    out = mtseg_kernels.hog_pseudo_label(augmented)
    assert out.shape == (8, 504)
    benchmark(mtseg_kernels.hog_pseudo_label, augmented)


def test_hog_targets_skimage_in_loader(benchmark, runtime_info, augmented):
    _describe(benchmark, runtime_info, "hog-targets-8x256", "skimage per image (data loader)", "peer", 8)
    images = [im[0].numpy().astype(np.float64) for im in augmented]

    def run():
        return np.stack([skimage_hog(skimage_resize(im, (128, 64), anti_aliasing=True), orientations=6,
                                     pixels_per_cell=(16, 16), cells_per_block=(2, 2), block_norm="L2-Hys")
                         for im in images])

    assert run().shape == (8, 504)
    benchmark(run)
