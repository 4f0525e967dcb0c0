"""Speed of ``mtseg_kernels.hog`` against its peers, measured in the same run.

Cases (each is one pytest-benchmark group, so its contestants are reported together):

* ``hog-mtl-504``: the HOG-MTL preset, 256 RGB 128x64 images, 6 orientations, 16x16
  cells, 2x2 blocks, L2-Hys -> 504 values per image.
* ``hog-mtl-504-fwd+bwd``: the same, forward and backward (gradient w.r.t. the images).
* ``hog-large-512``: 8 RGB 512x512 images, 9 orientations, 8x8 cells, 3x3 blocks
  (skimage's defaults) -> 311364 values per image.
* ``hog-large-512-fwd+bwd``: the same, forward and backward.
* ``memory-copy-1GiB``: ``torch.Tensor.copy_`` of 1 GiB, a STREAM-like copy that gives
  this machine's memory bandwidth (2 GiB moved per call), to set the bytes each HOG
  case moves against (``benchmarks/README.md``).

Thread counts: ``--bench-threads N`` (conftest.py) sets torch's and OpenCV's. On a
loaded machine, 1-thread runs are best timed in CPU time,
``--benchmark-timer=time.process_time`` (it adds the CPU time of all threads, so use
wall time, the default, for runs with more threads); the timer is in the JSON's
``options``.

Contestants: mtseg on CPU (one call on the whole batch), mtseg on CUDA (skipped without
a GPU), ``skimage.feature.hog`` in a Python loop over the images (the semantics mtseg
reproduces), OpenCV's ``HOGDescriptor`` per image (different semantics, uint8 input only:
a speed anchor), and the pure-torch reference ``hog_reference`` (eager torch, float64).

All inputs are real RGB crops from ``skimage.data`` and are prepared once per module;
the timed functions only compute descriptors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.feature import hog as skimage_hog

import mtseg_kernels
from mtseg_kernels.reference.hog import hog_reference

# Rounds for the contestants that take seconds per call (skimage loop, eager torch);
# the fast ones use pytest-benchmark's own calibration (--benchmark-min-rounds etc.).
SLOW_ROUNDS = 3
CUDA_WARMUP_CALLS = 3


@dataclass(frozen=True)
class HogCase:
    group: str
    batch: int
    height: int
    width: int
    orientations: int
    pixels_per_cell: tuple[int, int]
    cells_per_block: tuple[int, int]
    block_norm: str = "L2-Hys"

    @property
    def hog_kwargs(self) -> dict[str, object]:
        return {
            "orientations": self.orientations,
            "pixels_per_cell": self.pixels_per_cell,
            "cells_per_block": self.cells_per_block,
            "block_norm": self.block_norm,
        }

    @property
    def descriptor_dim(self) -> int:
        shape = mtseg_kernels.hog_output_shape(
            (self.height, self.width), self.orientations, self.pixels_per_cell, self.cells_per_block
        )
        return math.prod(shape)

    def opencv_descriptor(self) -> cv2.HOGDescriptor:
        """The OpenCV descriptor with the same window, cell and block geometry.

        cv::Size is (width, height); blocks step by one cell as in skimage. The whole image
        is one detection window, so ``compute`` returns one descriptor per image.
        """
        (cell_r, cell_c), (block_r, block_c) = self.pixels_per_cell, self.cells_per_block
        return cv2.HOGDescriptor(
            (self.width, self.height),
            (block_c * cell_c, block_r * cell_r),
            (cell_c, cell_r),
            (cell_c, cell_r),
            self.orientations,
        )


HOG_MTL = HogCase("hog-mtl-504", 256, 128, 64, 6, (16, 16), (2, 2))
LARGE = HogCase("hog-large-512", 8, 512, 512, 9, (8, 8), (3, 3))
FORWARD_CASES = [HOG_MTL, LARGE]


@dataclass(frozen=True)
class Inputs:
    case: HogCase
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1], contiguous: mtseg and eager torch
    images_uint8: torch.Tensor  # (B, 3, H, W) uint8, the same pixels: mtseg on 8-bit input
    hwc_float: list[np.ndarray]  # B x (H, W, 3) float32 in [0, 1]: skimage
    hwc_uint8: list[np.ndarray]  # B x (H, W, 3) uint8, the same pixels: OpenCV


def _rgb_sources() -> list[np.ndarray]:
    # Bundled with scikit-image (no download). Several textures: natural photo,
    # histology, fundus, astronomy; retina has large black borders (flat regions).
    return [
        skdata.astronaut(),
        skdata.immunohistochemistry(),
        skdata.retina(),
        skdata.hubble_deep_field(),
        skdata.coffee(),
        skdata.rocket(),
        skdata.chelsea(),
    ]


def _crops(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` deterministic (height, width, 3) uint8 crops, round-robin over the sources
    large enough; every second pass over the sources is mirrored so repeats differ."""
    rng = np.random.default_rng(seed)
    sources = [im for im in _rgb_sources() if im.shape[0] >= height and im.shape[1] >= width]
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        src = sources[i % len(sources)]
        top = rng.integers(0, src.shape[0] - height + 1)
        left = rng.integers(0, src.shape[1] - width + 1)
        crop = src[top : top + height, left : left + width]
        out[i] = crop[:, ::-1] if (i // len(sources)) % 2 else crop
    return out


@functools.cache
def _inputs(case: HogCase) -> Inputs:
    uint8 = _crops(case.batch, case.height, case.width)
    floats = uint8.astype(np.float32) / np.float32(255.0)
    images = torch.from_numpy(floats).permute(0, 3, 1, 2).contiguous()
    return Inputs(
        case=case,
        images=images,
        images_uint8=torch.from_numpy(uint8).permute(0, 3, 1, 2).contiguous(),
        hwc_float=[np.ascontiguousarray(im) for im in floats],
        hwc_uint8=[np.ascontiguousarray(im) for im in uint8],
    )


@pytest.fixture(scope="module", params=FORWARD_CASES, ids=[c.group for c in FORWARD_CASES])
def inputs(request: pytest.FixtureRequest) -> Inputs:
    return _inputs(request.param)


@pytest.fixture(scope="module")
def hog_mtl_inputs() -> Inputs:
    return _inputs(HOG_MTL)


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not mtseg_kernels.backends()["cuda_compiled"]:
        return "mtseg_kernels was built without its CUDA kernels"
    return None


_CUDA_SKIP = _cuda_skip_reason()
requires_cuda = pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")


def _describe(
    benchmark,
    runtime_info: dict[str, object],
    case: HogCase,
    *,
    contestant: str,
    role: str,
    device: str,
    input_dtype: str,
    group: str | None = None,
    **extra: object,
) -> None:
    """Set the group and record what summarize.py and a reader of the JSON need."""
    benchmark.group = group or case.group
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(
        contestant=contestant,
        role=role,  # "mtseg" rows are the baselines of the speed-up columns
        device=device,
        input_dtype=input_dtype,
        n_images=case.batch,
        channels=3,
        image_size=f"{case.height}x{case.width}",
        descriptor_dim=case.descriptor_dim,
        orientations=case.orientations,
        pixels_per_cell=list(case.pixels_per_cell),
        cells_per_block=list(case.cells_per_block),
        block_norm=case.block_norm,
        **extra,
    )


# --------------------------------------------------------------------------------------
# Forward: one group per case
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_dtype", ["float32", "uint8"])
def test_mtseg_cpu(benchmark, runtime_info, inputs: Inputs, input_dtype: str) -> None:
    case = inputs.case
    images = inputs.images if input_dtype == "float32" else inputs.images_uint8
    _describe(benchmark, runtime_info, case, contestant=f"mtseg (CPU, batched, {input_dtype})", role="mtseg",
              device="cpu", input_dtype=str(images.dtype))

    def run() -> torch.Tensor:
        return mtseg_kernels.hog(images, **case.hog_kwargs)

    assert run().shape == (case.batch, case.descriptor_dim)  # also the untimed warm-up
    benchmark(run)


@pytest.mark.cuda
@requires_cuda
def test_mtseg_cuda(benchmark, runtime_info, inputs: Inputs) -> None:
    case = inputs.case
    # Resident on the device before timing: the transfer is not part of the op.
    images = inputs.images.to("cuda")
    _describe(benchmark, runtime_info, case, contestant="mtseg (CUDA, batched)", role="mtseg",
              device=f"cuda ({torch.cuda.get_device_name()})", input_dtype=str(images.dtype))

    def run() -> torch.Tensor:
        out = mtseg_kernels.hog(images, **case.hog_kwargs)
        torch.cuda.synchronize()
        return out

    for _ in range(CUDA_WARMUP_CALLS):
        out = run()
    assert out.shape == (case.batch, case.descriptor_dim)
    benchmark(run)


def test_skimage_loop(benchmark, runtime_info, inputs: Inputs) -> None:
    case, images = inputs.case, inputs.hwc_float
    _describe(benchmark, runtime_info, case, contestant="skimage.feature.hog (loop)", role="peer",
              device="cpu", input_dtype=str(images[0].dtype), parallelism="single-threaded Python loop")

    def run() -> list[np.ndarray]:
        return [skimage_hog(im, channel_axis=-1, **case.hog_kwargs) for im in images]

    out = benchmark.pedantic(run, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    assert out[0].shape == (case.descriptor_dim,)


def test_opencv_loop(benchmark, runtime_info, inputs: Inputs) -> None:
    case, images = inputs.case, inputs.hwc_uint8
    descriptor = case.opencv_descriptor()
    _describe(benchmark, runtime_info, case, contestant="OpenCV HOGDescriptor (loop)", role="peer",
              device="cpu", input_dtype=str(images[0].dtype), semantics="OpenCV (differs from skimage)")

    def run() -> list[np.ndarray]:
        return [descriptor.compute(im) for im in images]

    # OpenCV's descriptor has the same length here, not the same values.
    assert run()[0].size == case.descriptor_dim
    benchmark(run)


def test_eager_torch_reference(benchmark, runtime_info, inputs: Inputs) -> None:
    case, images = inputs.case, inputs.images
    _describe(benchmark, runtime_info, case, contestant="eager torch (hog_reference, float64)", role="peer",
              device="cpu", input_dtype=str(images.dtype))

    def run() -> torch.Tensor:
        return hog_reference(images, **case.hog_kwargs).flatten(1)

    out = benchmark.pedantic(run, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    assert out.shape == (case.batch, case.descriptor_dim)


# --------------------------------------------------------------------------------------
# Forward + backward: one group per case
# --------------------------------------------------------------------------------------
BACKWARD_GROUP = f"{HOG_MTL.group}-fwd+bwd"


def _backward_group(case: HogCase) -> str:
    return f"{case.group}-fwd+bwd"


@functools.cache
def _cotangent(case: HogCase) -> torch.Tensor:
    """A fixed upstream gradient for the backward benchmarks (not all ones, so the
    block-normalisation backward does real work)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(case.batch, case.descriptor_dim, generator=gen)


@pytest.fixture(scope="module")
def hog_mtl_cotangent() -> torch.Tensor:
    return _cotangent(HOG_MTL)


def _fwd_bwd(fn, images: torch.Tensor, cotangent: torch.Tensor):
    """A function computing the HOG of ``images`` and its vector-Jacobian product."""

    def run() -> torch.Tensor:
        out = fn(images)
        (grad,) = torch.autograd.grad(out, images, cotangent.to(out.dtype))
        return grad

    return run


def test_mtseg_cpu_backward(benchmark, runtime_info, inputs: Inputs) -> None:
    case = inputs.case
    images = inputs.images.clone().requires_grad_()
    _describe(benchmark, runtime_info, case, contestant="mtseg (CPU, fwd+bwd)", role="mtseg",
              device="cpu", input_dtype=str(images.dtype), group=_backward_group(case))
    run = _fwd_bwd(lambda x: mtseg_kernels.hog(x, **case.hog_kwargs), images, _cotangent(case))
    assert run().shape == images.shape
    benchmark(run)


@pytest.mark.cuda
@requires_cuda
def test_mtseg_cuda_backward(benchmark, runtime_info, inputs: Inputs) -> None:
    case = inputs.case
    images = inputs.images.to("cuda").requires_grad_()
    cotangent = _cotangent(case).to("cuda")
    _describe(benchmark, runtime_info, case, contestant="mtseg (CUDA, fwd+bwd)", role="mtseg",
              device=f"cuda ({torch.cuda.get_device_name()})", input_dtype=str(images.dtype),
              group=_backward_group(case))
    grad_fn = _fwd_bwd(lambda x: mtseg_kernels.hog(x, **case.hog_kwargs), images, cotangent)

    def run() -> torch.Tensor:
        grad = grad_fn()
        torch.cuda.synchronize()
        return grad

    for _ in range(CUDA_WARMUP_CALLS):
        run()
    benchmark(run)


def test_eager_torch_reference_backward(benchmark, runtime_info, hog_mtl_inputs: Inputs, hog_mtl_cotangent) -> None:
    case = hog_mtl_inputs.case
    images = hog_mtl_inputs.images.clone().requires_grad_()
    _describe(benchmark, runtime_info, case, contestant="eager torch (hog_reference, fwd+bwd)", role="peer",
              device="cpu", input_dtype=str(images.dtype), group=BACKWARD_GROUP)
    run = _fwd_bwd(lambda x: hog_reference(x, **case.hog_kwargs).flatten(1), images, hog_mtl_cotangent)
    out = benchmark.pedantic(run, rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
    assert out.shape == images.shape


# --------------------------------------------------------------------------------------
# Memory bandwidth of this machine, the physical limit of the cases above
# --------------------------------------------------------------------------------------
COPY_BYTES = 1 << 30


def test_memory_copy_bandwidth(benchmark, runtime_info) -> None:
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # both buffers paged in before timing
    benchmark.group = "memory-copy-1GiB"
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(contestant="torch copy_ (1 GiB read + 1 GiB written)", role="peer", device="cpu",
                                bytes_moved=2 * COPY_BYTES)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=SLOW_ROUNDS, iterations=1, warmup_rounds=0)
