"""Triton kernels of the ops whose GPU implementation is Triton, and their launchers.

Importing a module here registers its launchers as the CUDA kernels of the matching
``torch.ops.mtseg`` operators. The launchers take tensors on any device: on a CPU
machine they run in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), which is how the tests cover the GPU code path without a GPU.
"""

from __future__ import annotations

try:  # triton ships with CUDA builds of torch; without it the CUDA path is simply absent
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only torch builds
    HAS_TRITON = False
