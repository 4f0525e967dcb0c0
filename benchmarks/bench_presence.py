"""Speed and memory of the fused sync loss against the eager PyTorch composition and
``torch.compile`` of that composition, in the same run.

Cases (one pytest-benchmark group each; forward + backward):

* ``sync-2d``: seg logits (16, 12, 256, 256), the TDSNet-sized 2D batch.
* ``sync-3d``: seg logits (2, 4, 144, 144, 19), BraTS-style crops.

each in every mode: ``max``, ``noisy_or`` and ``smooth_max`` with direction ``both`` (the
segmentation and the class head get gradients), ``hard`` and ``argmax`` with direction
``seg_to_class`` (they have no gradient: only the class head learns, as in TDSNet). The
eager composition is what users write today: ``softmax`` over classes, a reduction over
space, ``binary_cross_entropy``. The CUDA contestants (mtseg and compiled on a GPU, timed
with ``torch.cuda.synchronize()``) skip, with the reason, where there is no GPU.

Peak memory: each contestant runs once more in a fresh subprocess, after a warm-up step,
while a thread samples the resident set every 0.2 ms (glibc told to map every large
block, so that freed memory leaves the resident set); the peak growth over the RSS before
the step (inputs allocated, gradients freed) is stored as ``peak_extra_mib`` in the
benchmark's extra_info. It includes the input gradient (the seg-logits size), which
every contestant must produce.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

import mtseg_kernels as mk

CASES = {"sync-2d": (16, 12, 256, 256), "sync-3d": (2, 4, 144, 144, 19)}
MODES = ("max", "noisy_or", "smooth_max", "hard", "argmax")
HARD_MODES = ("hard", "argmax")
TEMPERATURE, THRESHOLD = 0.1, 0.5


def direction(mode: str) -> str:
    return "seg_to_class" if mode in HARD_MODES else "both"


def eager_sync_loss(seg: torch.Tensor, cls: torch.Tensor, mode: str) -> torch.Tensor:
    """The plain composition: what the fused op replaces."""
    if mode == "argmax":  # present where the arg-max map holds the class
        q = torch.zeros_like(cls).scatter_(1, seg.detach().argmax(1).flatten(1), 1.0)
        return F.binary_cross_entropy_with_logits(cls, q)
    p = torch.softmax(seg, dim=1).flatten(2)
    if mode == "hard":
        q = (p.detach() > THRESHOLD).any(2).to(cls.dtype)
        return F.binary_cross_entropy_with_logits(cls, q)
    if mode == "max":
        q = p.amax(2)
    elif mode == "noisy_or":
        q = -torch.expm1(torch.log1p(-p).sum(2))
    else:
        q = TEMPERATURE * (torch.logsumexp(p / TEMPERATURE, 2) - math.log(p.shape[2]))
    s2c = F.binary_cross_entropy_with_logits(cls, q.detach(), reduction="none")
    c2s = F.binary_cross_entropy(q, torch.sigmoid(cls).detach(), reduction="none")
    return (s2c + c2s).mean()


def fused_sync_loss(seg: torch.Tensor, cls: torch.Tensor, mode: str) -> torch.Tensor:
    return mk.sync_loss(seg, cls, mode, direction(mode), temperature=TEMPERATURE, threshold=THRESHOLD)


_compiled = torch.compile(eager_sync_loss, dynamic=False)
CONTESTANTS = {"mtseg": fused_sync_loss, "eager": eager_sync_loss, "compiled": _compiled}
CUDA_CONTESTANTS = {"mtseg-cuda": fused_sync_loss, "compiled-cuda": _compiled}


def _inputs(shape, device="cpu"):
    g = torch.Generator().manual_seed(0)
    seg = (torch.randn(shape, generator=g) * 2).to(device).requires_grad_(True)
    cls = torch.randn(shape[:2], generator=g).to(device).requires_grad_(True)
    return seg, cls


def _step(fn, seg, cls, mode):
    seg.grad = cls.grad = None
    fn(seg, cls, mode).backward()
    if seg.is_cuda:
        torch.cuda.synchronize()


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time, torch
    sys.path.insert(0, {bench_dir!r})
    import bench_presence as b
    torch.set_num_threads({threads})
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    seg, cls = b._inputs({shape!r})
    fn = b.CONTESTANTS[{name!r}]
    b._step(fn, seg, cls, {mode!r})  # warm-up (compilation for torch.compile)
    seg.grad = cls.grad = None
    peak, done = [0], [False]
    def poll():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)
    base = rss()
    t = threading.Thread(target=poll)
    t.start()
    b._step(fn, seg, cls, {mode!r})
    done[0] = True
    t.join()
    print(json.dumps({{"peak_extra_mib": (peak[0] - base) / 2**20}}))
    """
)


def peak_extra_mib(name: str, shape, mode: str) -> float:
    from pathlib import Path

    script = PEAK_SCRIPT.format(
        bench_dir=str(Path(__file__).parent), threads=torch.get_num_threads(), shape=tuple(shape), name=name, mode=mode
    )
    # A fixed mmap threshold: every large block is mapped on allocation and unmapped on
    # free, so the resident set follows the live tensors (glibc's default threshold grows
    # after the first free and then keeps freed blocks resident, hiding later peaks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contestant", list(CONTESTANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_sync_loss_fwd_bwd(benchmark, runtime_info, case, contestant, mode):
    shape = CASES[case]
    benchmark.group = f"{case}-{mode}"
    seg, cls = _inputs(shape)
    fn = CONTESTANTS[contestant]
    _step(fn, seg, cls, mode)  # warm-up (and compilation for torch.compile)
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(
        contestant=f"{contestant} sync_loss fwd+bwd",
        role="mtseg" if contestant == "mtseg" else "peer",  # baseline of summarize.py's speed-up column
        device="cpu",
        input_dtype="float32",
        n_images=shape[0],
        shape=list(shape),
        mode=mode,
        direction=direction(mode),
    )
    benchmark.pedantic(_step, args=(fn, seg, cls, mode), rounds=5, warmup_rounds=1)
    benchmark.extra_info["peak_extra_mib"] = round(peak_extra_mib(contestant, shape, mode), 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contestant", list(CUDA_CONTESTANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_sync_loss_fwd_bwd_cuda(benchmark, runtime_info, case, contestant, mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    shape = CASES[case]
    benchmark.group = f"{case}-{mode}-cuda"
    seg, cls = _inputs(shape, "cuda")
    fn = CUDA_CONTESTANTS[contestant]
    for _ in range(3):  # warm-up: Triton and inductor compilation
        _step(fn, seg, cls, mode)
    benchmark.extra_info.update(runtime_info)
    benchmark.extra_info.update(
        contestant=f"{contestant} sync_loss fwd+bwd",
        role="mtseg" if contestant.startswith("mtseg") else "peer",
        device=torch.cuda.get_device_name(),
        input_dtype="float32",
        n_images=shape[0],
        shape=list(shape),
        mode=mode,
        direction=direction(mode),
    )
    benchmark.pedantic(_step, args=(fn, seg, cls, mode), rounds=20, warmup_rounds=2)
