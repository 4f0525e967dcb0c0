"""Triton kernels of the presence operators and their launchers: the CUDA implementation
of ``mtseg::class_counts``, ``mtseg::soft_presence_forward`` and
``mtseg::soft_presence_backward`` (``mtseg_kernels.ops.presence`` registers them).

Same algorithm as the CPU kernels (``csrc/cpu/presence.cpp``). The forward runs one
program per (image, run of chunks): it loads the logits of all K classes of a chunk as a
``(K_BLOCK, BLOCK)`` tile, forms the probabilities (max-subtracted softmax or a stable
sigmoid) and ``log(1 - p)`` or ``1 - p`` without cancellation, reduces each class over
the chunk and merges the chunks of its run in order; a second kernel merges the runs of
an image in order, in float64, into the presence and the ``(B, K, 2)`` statistics. Every
reduction has a fixed order for a given shape, so results are deterministic. The
backward recomputes the tile from the input and the statistics.

GPU arithmetic is kept close to the CPU's: float64 scalars (temperature, threshold) are
float64 kernel parameters; divisions are correctly rounded; exp and log are libdevice's
accurate ones (Triton's ``tl.exp``/``tl.log`` of float32 are fast approximations);
floating-point contraction (FMA) is off, as in the C++ build. Under Triton's interpreter
(``TRITON_INTERPRET=1``, how the CPU tests run these kernels), which has no libdevice,
``tl.exp``/``tl.log`` are numpy's. No launch reads device memory on the host: the
kernels never synchronise the device and can be captured in a CUDA graph.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..ops.presence_checks import check_backward_args, check_label_args, check_soft_presence_args

MODES = {"max": 0, "noisy_or": 1, "smooth_max": 2, "hard": 3, "argmax": 4}
ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
MAX_CLASSES = 64  # soft presence on CUDA: all K classes of a chunk live in one tile
_INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))
# max: the partial index word holds (voxel index + 1) and, at this bit, "a NaN was seen".
_NAN_BIT = tl.constexpr(1 << 40)


# --------------------------------------------------------------------------------------
# Launch configuration: one place, used by the launchers and by the ahead-of-time
# compile test (tests/ops/test_triton_compile.py).
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    k_block: int  # classes per tile (K rounded up to a power of two)
    block: int  # voxels per chunk
    num_warps: int


def tile_config(K: int, f64: bool, backward: bool = False) -> TileConfig:
    """Tile of the forward and backward kernels for K classes, 8 warps: 2048 float32 /
    1024 float64 elements (8 and 4 per thread) forward, half that backward (its tile holds
    more per element). Each fits MAX_REGISTERS without spills; more per thread, or fewer
    warps with the same tile, makes ptxas spill. The ahead-of-time compile test
    (tests/ops/test_triton_compile.py) checks every kernel for spills on sm_80 and sm_90."""
    if not 1 <= K <= MAX_CLASSES:
        raise ValueError(f"soft_presence on CUDA supports 1 to {MAX_CLASSES} classes; got K = {K}")
    k_block = triton.next_power_of_2(K)
    elements = (1024 if f64 else 2048) // (2 if backward else 1)
    return TileConfig(k_block, max(16, elements // k_block), 8)


# Register cap of every launch (the PTX .maxnreg): without it ptxas picks its own target
# and spills a register or two even in small kernels; 128 keeps 16 warps per SM resident.
MAX_REGISTERS = 128
MERGE_CHUNKS = 32  # runs per step of the merge kernel
MERGE_CLASSES = 16  # classes per program of the merge kernel
TARGET_PROGRAMS = 4096  # forward programs to aim for: enough to fill any current GPU


def run_layout(B: int, C: int) -> tuple[int, int]:
    """(runs per image R, chunks per run) so that B * R is about TARGET_PROGRAMS."""
    runs = max(1, min(C, triton.cdiv(TARGET_PROGRAMS, B)))
    per_run = triton.cdiv(C, runs)
    return triton.cdiv(C, per_run), per_run


MERGE_WARPS = 4
MAX_BACKWARD_WARPS = 1  # one image per program, K classes: a warp is plenty
COUNT_BLOCK = 1024  # voxels per program of the class-count kernel
COUNT_CLASSES = 64  # classes per program of the class-count kernel
COUNT_WARPS = 4


# --------------------------------------------------------------------------------------
# Elementwise helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _exp(x):
    if _INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _log(x):
    if _INTERPRET:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def _div(a, b):
    # correctly rounded: a float32 '/' compiles to an approximate division (float64's is
    # exact already). Both operands must be tensors: a Python float would make a float64
    # division float32 in the interpreter.
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.fdiv(a, b, ieee_rounding=True)


@triton.jit
def _log1p(y):
    # log(1 + y) from log(1 + y) rounded (Goldberg's correction y / ((1 + y) - 1)):
    # exact to a few ulp where 1 + y rounds to 1. As log1p_ in csrc/cpu/presence.cpp.
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, _log(u) * _div(y, tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _scaled_exp(p, m, inv_t):
    # exp((p - m) / T) as exp((p - m) * (1 / T)); p = m gives 1 even where 1 / T overflows.
    d = p - m
    return _exp(tl.where(d == 0.0, 0.0, d * inv_t))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation (Kahan): (u - 1) * x / log(u) with u = exp(x).
    u = _exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, _div(um1 * x, _log(tl.where(u == 1.0, 2.0, u)))))


@triton.jit
def _load_tile(z_ptr, mask_ptr, b, c, K, N, ACT: tl.constexpr, HAS_MASK: tl.constexpr, K_BLOCK: tl.constexpr,
               BLOCK: tl.constexpr, F64: tl.constexpr):
    """Logits of one (K_BLOCK, BLOCK) tile in the working type, and the voxels' validity.
    Softmax pads missing classes with -inf; padding voxels hold 0 (masked out later)."""
    ks = tl.arange(0, K_BLOCK)
    xs = c * BLOCK + tl.arange(0, BLOCK)
    kin = ks < K
    xin = xs < N
    offs = b.to(tl.int64) * K * N + ks[:, None].to(tl.int64) * N + xs[None, :]
    inside = kin[:, None] & xin[None, :]
    z = tl.load(z_ptr + offs, mask=inside, other=0.0)
    if F64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    if ACT == 0:
        z = tl.where(kin[:, None], z, float("-inf"))
    valid = xin
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b.to(tl.int64) * N + xs, mask=xin, other=0) != 0)
    return z, valid, ks, kin, xs, offs, inside


@triton.jit
def _probabilities(z, ks, kin, ACT: tl.constexpr, EXTRA: tl.constexpr, K_BLOCK: tl.constexpr):
    """p of every class of the tile and, by EXTRA, log(1 - p) (1) or 1 - p (2), both
    without cancellation: for the winning class of a voxel (softmax) from the other
    classes' mass, for sigmoid from exp(-|z|). A NaN logit makes every class NaN at its
    voxel under softmax, as on the CPU."""
    if ACT == 0:
        has_nan = tl.max((z != z).to(tl.int32), axis=0) > 0
        zmax = tl.where(has_nan, float("nan"), tl.max(z, axis=0))
        # the first class holding the maximum, as the CPU's strict '>' scan
        winner = tl.min(tl.where(kin[:, None] & (z == zmax[None, :]), ks[:, None], K_BLOCK), axis=0)
        e = tl.where(kin[:, None], _exp(z - zmax[None, :]), 0.0)
        is_winner = ks[:, None] == winner[None, :]
        others = tl.sum(tl.where(is_winner, 0.0, e), axis=0)
        inv = _div(tl.full(others.shape, 1.0, others.dtype), 1.0 + others)
        p = e * inv[None, :]
        if EXTRA == 1:
            extra = tl.where(is_winner, _log(others * inv)[None, :], _log1p(-p))
        elif EXTRA == 2:
            extra = tl.where(is_winner, (others * inv)[None, :], 1.0 - p)
        else:
            extra = p  # unused
    elif ACT == 1:
        a = _exp(-tl.abs(z))
        p = _div(tl.where(z >= 0, 1.0, a), 1.0 + a)
        if EXTRA == 1:
            extra = -(tl.maximum(z, 0.0) + _log1p(a))
        elif EXTRA == 2:
            extra = _div(tl.where(z >= 0, a, 1.0), 1.0 + a)
        else:
            extra = p  # unused
    else:
        p = z
        if EXTRA == 1:
            extra = _log1p(-z)
        elif EXTRA == 2:
            extra = 1.0 - z
        else:
            extra = p  # unused
    return p, extra


# --------------------------------------------------------------------------------------
# Forward: per (image, run of chunks) partials, then one merge per image
# --------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(z_ptr, mask_ptr, pa_ptr, pb_ptr, pi_ptr, pn_ptr, K, N, C, R, PER_RUN,
                    temperature: tl.float64, threshold: tl.float64,
                    MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, K_BLOCK: tl.constexpr,
                    BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // R
    c0 = (pid % R) * PER_RUN
    c1 = tl.minimum(c0 + PER_RUN, C)
    ks = tl.arange(0, K_BLOCK)
    kin = ks < K
    if F64:
        WT: tl.constexpr = tl.float64
        inv_t = 1.0 / temperature
        thr = threshold
    else:
        WT: tl.constexpr = tl.float32
        inv_t = tl.cast(1.0 / temperature, tl.float32)
        thr = tl.cast(threshold, tl.float32)
    # Running state of the run, per class, in the working type where exactness allows
    # (each float64 class vector costs registers in every thread).
    if MODE == 0:  # value, complement, voxel index of the maximum; NaN seen
        run_a = tl.full([K_BLOCK], float("-inf"), dtype=WT)
        run_b = tl.full([K_BLOCK], float("inf"), dtype=WT)
        run_i = tl.full([K_BLOCK], -1, dtype=tl.int32)
        run_nan = tl.zeros([K_BLOCK], dtype=tl.int32)
    elif MODE == 1:  # sum of the finite log(1 - p) in float64 (as the CPU), count of -inf
        run_a = tl.zeros([K_BLOCK], dtype=tl.float64)
        run_b = tl.zeros([K_BLOCK], dtype=tl.int32)
    elif MODE == 2:  # max m and sum exp((p - m) / T) of an online softmax; NaN seen
        run_a = tl.full([K_BLOCK], float("-inf"), dtype=WT)
        run_b = tl.zeros([K_BLOCK], dtype=WT)
        run_nan = tl.zeros([K_BLOCK], dtype=tl.int32)
        run_n = tl.full((), 0, dtype=tl.int32)  # valid voxels of the run
    else:  # hard, argmax: hit
        run_a = tl.zeros([K_BLOCK], dtype=tl.int32)
    for c in range(c0, c1):
        z, valid, ks, kin, xs, offs, inside = _load_tile(z_ptr, mask_ptr, b, c, K, N, ACT, HAS_MASK, K_BLOCK,
                                                         BLOCK, F64)
        valid2 = kin[:, None] & valid[None, :]
        if MODE == 4:  # argmax of the input over classes; NaN is the largest, as torch.argmax
            isnan = kin[:, None] & (z != z)
            first_nan = tl.min(tl.where(isnan, ks[:, None], K_BLOCK), axis=0)
            zc = tl.where(kin[:, None] & (z == z), z, float("-inf"))
            top = tl.max(zc, axis=0)
            win = tl.min(tl.where(kin[:, None] & (zc == top[None, :]), ks[:, None], K_BLOCK), axis=0)
            win = tl.where(first_nan < K_BLOCK, first_nan, win)
            run_a = tl.maximum(run_a, tl.max((valid2 & (ks[:, None] == win[None, :])).to(tl.int32), axis=1))
        else:
            p, extra = _probabilities(z, ks, kin, ACT, 1 if MODE == 1 else (2 if MODE == 0 else 0), K_BLOCK)
            if MODE == 0:
                # the largest p; among equal p the smallest complement; then the first voxel
                ok = valid2 & (p == p)
                run_nan = tl.maximum(run_nan, tl.max((valid2 & (p != p)).to(tl.int32), axis=1))
                best = tl.max(tl.where(ok, p, float("-inf")), axis=1)
                is_best = ok & (p == best[:, None])
                best_c = tl.min(tl.where(is_best, extra, float("inf")), axis=1)
                at = tl.min(tl.where(is_best & (extra == best_c[:, None]), xs[None, :], N), axis=1)
                take = (at < N) & ((run_i < 0) | (best > run_a) | ((best == run_a) & (best_c < run_b)))
                run_a = tl.where(take, best, run_a)
                run_b = tl.where(take, best_c, run_b)
                run_i = tl.where(take, at, run_i)
            elif MODE == 1:
                lv = tl.where(valid2, extra, 0.0)
                inf = lv == float("-inf")
                run_a += tl.sum(tl.where(inf, 0.0, lv).to(tl.float64), axis=1)
                run_b += tl.sum(inf.to(tl.int32), axis=1)
            elif MODE == 2:
                run_n += tl.sum(valid.to(tl.int32), axis=0)
                ok = valid2 & (p == p)
                run_nan = tl.maximum(run_nan, tl.max((valid2 & (p != p)).to(tl.int32), axis=1))
                top = tl.maximum(run_a, tl.max(tl.where(ok, p, float("-inf")), axis=1))
                live = top > float("-inf")
                safe = tl.where(live, top, 0.0)
                s = tl.sum(tl.where(ok, _scaled_exp(p, safe[:, None], inv_t), 0.0), axis=1)
                run_b = tl.where(live, run_b * _scaled_exp(run_a, safe, inv_t) + s, 0.0)
                run_a = top
            else:  # hard: any p > threshold
                run_a = tl.maximum(run_a, tl.max((valid2 & (p > thr)).to(tl.int32), axis=1))
    out = pid.to(tl.int64) * K + ks
    if MODE == 0:
        tl.store(pi_ptr + out, (run_i + 1).to(tl.int64) + run_nan.to(tl.int64) * _NAN_BIT, mask=kin)
        tl.store(pb_ptr + out, run_b.to(tl.float64), mask=kin)
    elif MODE == 1:
        tl.store(pb_ptr + out, run_b.to(tl.float64), mask=kin)
    elif MODE == 2:
        run_a = tl.where(run_nan > 0, float("nan"), run_a)
        tl.store(pb_ptr + out, run_b.to(tl.float64), mask=kin)
        tl.store(pn_ptr + pid, run_n.to(tl.int64))
    tl.store(pa_ptr + out, run_a.to(tl.float64), mask=kin)


@triton.jit
def _merge_kernel(pa_ptr, pb_ptr, pi_ptr, pn_ptr, presence_ptr, stats_ptr, K, N, R, temperature: tl.float64,
                  MODE: tl.constexpr, HAS_MASK: tl.constexpr, KB: tl.constexpr, RB: tl.constexpr):
    """Merges the R runs of image b, in order, for KB classes: presence and statistics."""
    b = tl.program_id(0)
    ks = tl.program_id(1) * KB + tl.arange(0, KB)
    kin = ks < K
    rows = tl.arange(0, RB)
    base = b.to(tl.int64) * R * K
    acc_a = tl.zeros([KB], dtype=tl.float64)
    acc_b = tl.zeros([KB], dtype=tl.float64)
    acc_i = tl.full([KB], -1, dtype=tl.int64)
    acc_nan = tl.zeros([KB], dtype=tl.int32)
    n_total = tl.zeros([RB], dtype=tl.int64)
    if MODE == 2:
        acc_a = tl.full([KB], float("-inf"), dtype=tl.float64)
    for r0 in range(0, R, RB):
        rs = r0 + rows
        m2 = (rs < R)[:, None] & kin[None, :]
        offs = base + rs[:, None].to(tl.int64) * K + ks[None, :]
        a = tl.load(pa_ptr + offs, mask=m2, other=0.0)
        bb = tl.load(pb_ptr + offs, mask=m2, other=0.0)
        if MODE == 0:
            code = tl.load(pi_ptr + offs, mask=m2, other=0)
            acc_nan = tl.maximum(acc_nan, tl.max((code >= _NAN_BIT).to(tl.int32), axis=0))
            idx = code % _NAN_BIT - 1
            has = idx >= 0
            best = tl.max(tl.where(has, a, float("-inf")), axis=0)
            is_best = has & (a == best[None, :])
            best_c = tl.min(tl.where(is_best, bb, float("inf")), axis=0)
            # among equal (p, complement) the smallest voxel index: the first run
            at = tl.min(tl.where(is_best & (bb == best_c[None, :]), idx, N), axis=0)
            any_has = tl.max(has.to(tl.int32), axis=0) > 0
            take = any_has & ((acc_i < 0) | (best > acc_a) | ((best == acc_a) & (best_c < acc_b)))
            acc_a = tl.where(take, best, acc_a)
            acc_b = tl.where(take, best_c, acc_b)
            acc_i = tl.where(take, at, acc_i)
        elif MODE == 1:
            acc_a += tl.sum(a, axis=0)
            acc_b += tl.sum(bb, axis=0)
        elif MODE == 2:  # first pass: the largest m of the runs that saw a valid voxel
            acc_nan = tl.maximum(acc_nan, tl.max((m2 & (a != a)).to(tl.int32), axis=0))
            acc_a = tl.maximum(acc_a, tl.max(tl.where(m2 & (bb > 0.0) & (a == a), a, float("-inf")), axis=0))
            n_total += tl.load(pn_ptr + b.to(tl.int64) * R + rs, mask=rs < R, other=0)
        else:
            acc_a = tl.maximum(acc_a, tl.max(a, axis=0))
    out = b.to(tl.int64) * K + ks
    if MODE == 0:
        presence = tl.where(acc_nan > 0, float("nan"), tl.where(acc_i >= 0, acc_a, 0.0))
        st0 = acc_i.to(tl.float64)
        st1 = tl.where(acc_i >= 0, acc_b, 1.0)
    elif MODE == 1:  # 1 - prod(1 - p) = -expm1(sum log(1 - p)); any p = 1 makes it 1
        presence = tl.where(acc_b > 0.0, tl.where(acc_a != acc_a, float("nan"), 1.0), -_expm1(acc_a))
        st0 = acc_a
        st1 = acc_b
    elif MODE == 2:  # second pass: s = sum over runs of s_r exp((m_r - m) / T)
        top = acc_a
        safe_top = tl.where(top > float("-inf"), top, 0.0)
        s = tl.zeros([KB], dtype=tl.float64)
        for r0 in range(0, R, RB):
            rs = r0 + rows
            m2 = (rs < R)[:, None] & kin[None, :]
            offs = base + rs[:, None].to(tl.int64) * K + ks[None, :]
            a = tl.load(pa_ptr + offs, mask=m2, other=0.0)
            bb = tl.load(pb_ptr + offs, mask=m2, other=0.0)
            s += tl.sum(tl.where(m2 & (bb > 0.0), bb * _exp((a - safe_top[None, :]) / temperature), 0.0), axis=0)
        if HAS_MASK:
            n = tl.sum(n_total, axis=0).to(tl.float64)
        else:
            n = tl.zeros([KB], dtype=tl.float64) + N
        presence = tl.where(n > 0.0, top + temperature * (_log(s) - _log(n)), 0.0)
        presence = tl.where(acc_nan > 0, float("nan"), presence)
        st0 = tl.where(acc_nan > 0, float("nan"), top)
        st1 = s
    else:
        presence = acc_a
        st0 = tl.zeros([KB], dtype=tl.float64)
        st1 = tl.zeros([KB], dtype=tl.float64)
    tl.store(presence_ptr + out, presence.to(presence_ptr.dtype.element_ty), mask=kin)
    tl.store(stats_ptr + 2 * out, st0, mask=kin)
    tl.store(stats_ptr + 2 * out + 1, st1, mask=kin)


# --------------------------------------------------------------------------------------
# Backward of noisy-or and smooth max: one program per (image, chunk)
# --------------------------------------------------------------------------------------
@triton.jit
def _activation_backward(z, p, G, kin, ACT: tl.constexpr):
    """dLoss/dz from dLoss/dp = G (as activation_backward in csrc/cpu/presence.cpp)."""
    if ACT == 0:
        dot = tl.sum(tl.where(kin[:, None], p * G, 0.0), axis=0)
        dz = p * (G - dot[None, :])
    elif ACT == 1:
        a = _exp(-tl.abs(z))
        q = _div(tl.where(z >= 0, a, 1.0), 1.0 + a)  # 1 - p without cancellation
        dz = G * p * q
    else:
        dz = G
    return dz


@triton.jit
def _backward_kernel(grad_ptr, z_ptr, mask_ptr, stats_ptr, out_ptr, K, N, C, temperature: tl.float64,
                     MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, K_BLOCK: tl.constexpr,
                     BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // C
    c = pid % C
    ks = tl.arange(0, K_BLOCK)
    kin = ks < K
    bk = b.to(tl.int64) * K + ks
    g = tl.load(grad_ptr + bk, mask=kin, other=0.0)
    sa = tl.load(stats_ptr + 2 * bk, mask=kin, other=0.0)
    sb = tl.load(stats_ptr + 2 * bk + 1, mask=kin, other=0.0)
    if F64:
        inv_t = 1.0 / temperature
    else:
        inv_t = tl.cast(1.0 / temperature, tl.float32)
    xs0 = c * BLOCK + tl.arange(0, BLOCK)
    xin0 = xs0 < N
    if HAS_MASK:
        v0 = xin0 & (tl.load(mask_ptr + b.to(tl.int64) * N + xs0, mask=xin0, other=0) != 0)
        all_valid = tl.sum((xin0 & ~v0).to(tl.int32), axis=0) == 0
    else:
        all_valid = True
    if MODE == 1:
        # d(1 - prod(1 - p))/dp_x = prod over the other voxels of (1 - p): per image, where
        # exp(S) (S = sum log(1 - p)) is a normal number and no p is 1, g exp(S) / (1 - p_x)
        # from the exact complements; else g exp(S - log(1 - p_x)), p = 1 handled apart.
        MIN_LOG: tl.constexpr = -700.0 if F64 else -80.0
        # below this S every exp(S - log(1 - p_x)) is 0: a saturated noisy-or, no gradient
        SATURATED: tl.constexpr = -1500.0 if F64 else -200.0
        by_logs = tl.sum((kin & ~((sb == 0.0) & (sa >= MIN_LOG))).to(tl.int32), axis=0) > 0
        if ACT == 2:  # probabilities as given: 1 - p is not exact, always the logs (as the CPU)
            by_logs = by_logs | True
        g_finite = (g == g) & (tl.abs(g) < float("inf"))
        zero_row = (g == 0.0) | ((sb == 0.0) & (sa < SATURATED) & g_finite)
        no_gradient = tl.sum((kin & ~zero_row).to(tl.int32), axis=0) == 0
    else:
        by_logs = False
        no_gradient = False
    offs0 = b.to(tl.int64) * K * N + ks[:, None].to(tl.int64) * N + xs0[None, :]
    if no_gradient & all_valid:  # every dPresence/dp is exactly 0, and no NaN p can hide here
        tl.store(out_ptr + offs0, tl.zeros([K_BLOCK, BLOCK], dtype=out_ptr.dtype.element_ty),
                 mask=kin[:, None] & xin0[None, :])
    else:
        z, valid, ks, kin, xs, offs, inside = _load_tile(z_ptr, mask_ptr, b, c, K, N, ACT, HAS_MASK, K_BLOCK,
                                                         BLOCK, F64)
        valid2 = kin[:, None] & valid[None, :]
        if F64:
            gw = g.to(tl.float64)
        else:
            gw = g.to(tl.float32)
        if MODE == 1:
            p, comp = _probabilities(z, ks, kin, ACT, 2, K_BLOCK)
            if by_logs:
                # log(1 - p) from the exact complement above 1/2, log1p(-p) below
                logq = tl.where(p > 0.5, _log(comp), _log1p(-p))
                S = sa.to(gw.dtype)
                lone = _exp(sa).to(gw.dtype)  # the one voxel with p = 1, when there is one
                d = tl.where(sb[:, None] == 0.0, _exp(S[:, None] - logq),
                             tl.where((sb[:, None] == 1.0) & (logq == float("-inf")), lone[:, None], 0.0))
                G = tl.where(valid2, gw[:, None] * d, 0.0)
            else:
                gp = (g.to(tl.float64) * _exp(sa)).to(gw.dtype)
                G = tl.where(valid2, _div(gp[:, None], tl.where(valid2, comp, 1.0)), 0.0)
        else:  # smooth max: d(m + T log(s / n))/dp_x = exp((p_x - m) / T) / s
            p, unused = _probabilities(z, ks, kin, ACT, 0, K_BLOCK)
            gs = _div(g.to(tl.float64), sb).to(gw.dtype)
            G = tl.where(valid2, gs[:, None] * _scaled_exp(p, sa.to(gw.dtype)[:, None], inv_t), 0.0)
        dz = _activation_backward(z, p, G, kin, ACT)
        tl.store(out_ptr + offs, dz.to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------
# Backward of max: each (image, class) gradient lands on its arg-max voxel
# --------------------------------------------------------------------------------------
@triton.jit
def _max_backward_kernel(grad_ptr, z_ptr, stats_ptr, out_ptr, K, N, ACT: tl.constexpr, K_BLOCK: tl.constexpr,
                         F64: tl.constexpr):
    """One program per image; its classes in order, each adding its gradient at its voxel
    (classes that share a voxel add up in class order, as on the CPU: deterministic).
    A stats index that is not an integer in [-1, N) (a raw caller's stats) is never used
    as an address: its class's gradient is NaN, written at voxel 0."""
    b = tl.program_id(0)
    js = tl.arange(0, K_BLOCK)
    jin = js < K
    base = b.to(tl.int64) * K * N
    for k in range(0, K):
        raw = tl.load(stats_ptr + 2 * (b.to(tl.int64) * K + k))
        ok = (raw == tl.floor(raw)) & (raw >= -1.0) & (raw < N)
        x = tl.where(ok & (raw >= 0.0), raw, 0.0).to(tl.int64)
        if F64:
            g = tl.load(grad_ptr + b.to(tl.int64) * K + k).to(tl.float64)
        else:
            g = tl.load(grad_ptr + b.to(tl.int64) * K + k).to(tl.float32)
        if (~ok) | ((raw >= 0.0) & (g != 0.0)):
            z = tl.load(z_ptr + base + js.to(tl.int64) * N + x, mask=jin, other=0.0)
            if F64:
                z = z.to(tl.float64)
            else:
                z = z.to(tl.float32)
            if ACT == 0:
                zm = tl.where(jin, z, float("-inf"))
                e = tl.where(jin, _exp(zm - tl.max(zm, axis=0)), 0.0)
                total = tl.sum(e, axis=0)
                others = tl.sum(tl.where(js == k, 0.0, e), axis=0)
                p = _div(e, total)
                pk = tl.sum(tl.where(js == k, p, 0.0), axis=0)
                # dp_k/dz_j = p_k (delta_jk - p_j); 1 - p_k from the other classes (exact near 1)
                contrib = tl.where(js == k, g * pk * _div(others, total), g * pk * -p)
            elif ACT == 1:
                zk = tl.sum(tl.where(js == k, z, 0.0), axis=0)
                a = _exp(-tl.abs(zk))
                contrib = tl.where(js == k, _div(g * a, (1.0 + a) * (1.0 + a)), 0.0)
            else:
                contrib = tl.where(js == k, g, 0.0)
            contrib = tl.where(ok, contrib, float("nan"))
            where = out_ptr + base + js.to(tl.int64) * N + x
            tl.store(where, tl.load(where, mask=jin, other=0.0) + contrib.to(out_ptr.dtype.element_ty), mask=jin)


# --------------------------------------------------------------------------------------
# Voxel counts per class, with the label check in the kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _counts_kernel(labels_ptr, counts_ptr, first_bad_ptr, N, C, K, ignore_index, K_BLOCK: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid // C
    c = pid % C
    xs = c * BLOCK + tl.arange(0, BLOCK)
    xin = xs < N
    lab = tl.load(labels_ptr + b.to(tl.int64) * N + xs, mask=xin, other=0).to(tl.int64)
    kept = xin & (lab != ignore_index)  # padding voxels are never counted, whatever ignore_index
    ks = kb * K_BLOCK + tl.arange(0, K_BLOCK)
    hits = tl.sum(tl.where(kept[None, :] & (lab[None, :] == ks[:, None]), 1, 0), axis=1)
    # integer atomics: the sum does not depend on their order
    tl.atomic_add(counts_ptr + b.to(tl.int64) * K + ks, hits.to(tl.int64), mask=(ks < K) & (hits > 0))
    if kb == 0:  # the first voxel of the image whose label is neither a class nor ignored
        bad = kept & ((lab < 0) | (lab >= K))
        first = tl.min(tl.where(bad, xs, N), axis=0)
        tl.atomic_min(first_bad_ptr + b, first.to(tl.int64), mask=first < N)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _device_guard(t: Tensor):
    """Launch on the tensor's device, whichever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _flat_voxels(input: Tensor, what: str) -> int:
    N = input[0, 0].numel() if input.dim() > 2 else input[0].numel()
    if N >= 2**31 - 2**16:
        raise ValueError(f"{what} on CUDA supports fewer than 2^31 - 2^16 voxels per image; got {N}")
    return N


def soft_presence_forward(
    input: Tensor, mode: str, activation: str, temperature: float, threshold: float, valid_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Launcher of the forward: ``(presence (B, K), stats (B, K, 2) float64)``, as the CPU op."""
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence")
    B, K = input.shape[:2]
    N = _flat_voxels(input, "soft_presence")
    f64 = input.dtype == torch.float64
    cfg = tile_config(K, f64)
    C = triton.cdiv(N, cfg.block)
    R, per_run = run_layout(B, C)
    z = input.contiguous()
    mask = None if valid_mask is None else valid_mask.contiguous().view(torch.uint8)
    dev = input.device
    pa = torch.empty((B * R, K), dtype=torch.float64, device=dev)
    pb = torch.empty_like(pa)
    pi = torch.empty((B * R, K), dtype=torch.int64, device=dev) if mode == "max" else pa
    pn = torch.empty((B * R,), dtype=torch.int64, device=dev) if mode == "smooth_max" else pa
    presence = torch.empty((B, K), dtype=torch.float64 if f64 else torch.float32, device=dev)
    stats = torch.empty((B, K, 2), dtype=torch.float64, device=dev)
    with _device_guard(input):
        _forward_kernel[(B * R,)](
            z, z if mask is None else mask, pa, pb, pi, pn, K, N, C, R, per_run, float(temperature),
            float(threshold), MODE=MODES[mode], ACT=ACTIVATIONS[activation], HAS_MASK=mask is not None,
            K_BLOCK=cfg.k_block, BLOCK=cfg.block, F64=f64, num_warps=cfg.num_warps, enable_fp_fusion=False,
            maxnreg=MAX_REGISTERS,
        )
        _merge_kernel[(B, triton.cdiv(K, MERGE_CLASSES))](
            pa, pb, pi, pn, presence, stats, K, N, R, float(temperature), MODE=MODES[mode],
            HAS_MASK=mask is not None, KB=MERGE_CLASSES, RB=MERGE_CHUNKS, num_warps=MERGE_WARPS,
            enable_fp_fusion=False, maxnreg=MAX_REGISTERS,
        )
    return presence, stats


def soft_presence_backward(
    grad: Tensor,
    input: Tensor,
    stats: Tensor,
    mode: str,
    activation: str,
    temperature: float,
    valid_mask: Tensor | None,
) -> Tensor:
    """Launcher of the backward: ``dLoss/dinput`` (contiguous, the input's dtype) from
    ``dLoss/dpresence (B, K)`` and the forward's statistics."""
    op = "soft_presence_backward"
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, op)
    check_backward_args(grad, input, stats, mode, op)
    B, K = input.shape[:2]
    N = _flat_voxels(input, op)
    f64 = input.dtype == torch.float64
    cfg = tile_config(K, f64, backward=True)
    z = input.contiguous()
    g = grad.to(torch.float64 if f64 else torch.float32).contiguous()
    st = stats.contiguous()
    with _device_guard(input):
        if mode == "max":
            out = torch.zeros_like(z, memory_format=torch.contiguous_format)
            _max_backward_kernel[(B,)](
                g, z, st, out, K, N, ACT=ACTIVATIONS[activation], K_BLOCK=cfg.k_block, F64=f64, num_warps=MAX_BACKWARD_WARPS,
                enable_fp_fusion=False, maxnreg=MAX_REGISTERS,
            )
            return out
        mask = None if valid_mask is None else valid_mask.contiguous().view(torch.uint8)
        C = triton.cdiv(N, cfg.block)
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
        _backward_kernel[(B * C,)](
            g, z, z if mask is None else mask, st, out, K, N, C, float(temperature), MODE=MODES[mode],
            ACT=ACTIVATIONS[activation], HAS_MASK=mask is not None, K_BLOCK=cfg.k_block, BLOCK=cfg.block, F64=f64,
            num_warps=cfg.num_warps, enable_fp_fusion=False, maxnreg=MAX_REGISTERS,
        )
    return out


# --------------------------------------------------------------------------------------
# class_counts: the label check without a device synchronisation
# --------------------------------------------------------------------------------------
@dataclass
class _LabelCheck:
    done: object  # () -> bool: the kernel and the copy of first_bad have finished
    wait: object  # () -> None
    first_bad: Tensor  # (B,) int64 on the host: first bad flat voxel per image, N = none
    labels: Tensor  # kept alive to name the bad value when the check fails
    num_classes: int
    ignore_index: int


_pending: list[_LabelCheck] = []
_pending_lock = threading.Lock()
MAX_PENDING = 16  # label checks in flight before a launch waits for the oldest


def _raise_if_bad(check: _LabelCheck) -> None:
    flat = check.labels.reshape(check.labels.shape[0], -1)
    N = flat.shape[1]
    bad = [(b, int(i)) for b, i in enumerate(check.first_bad.tolist()) if i < N]
    if bad:
        b, i = bad[0]
        raise ValueError(
            f"class_counts: image {b} holds the label {int(flat[b, i])} (at flat voxel index {i}); expected values "
            f"in [0, {check.num_classes}) or ignore_index = {check.ignore_index}"
            + (
                f" (labels {tuple(check.labels.shape)} on {check.labels.device}, checked after the kernel ran: "
                "CUDA label checks are reported by the next presence call or by check_label_errors())"
                if check.labels.is_cuda
                else ""
            )
        )


def check_label_errors(wait: bool = True) -> None:
    """Raises the first failed label check of earlier CUDA ``class_counts`` /
    ``presence_from_labels`` calls. Those calls check the labels inside the kernel and do
    not wait for it; each later call reports the checks that have finished by then. With
    ``wait``, waits for every pending check first (a device synchronisation)."""
    with _pending_lock:
        if wait:
            for check in _pending:
                check.wait()
        ready = [c for c in _pending if c.done()]
        for c in ready:
            _pending.remove(c)
    for c in ready:
        _raise_if_bad(c)


def class_counts(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Launcher of the voxel counts ``(B, K)`` int64. Labels outside ``[0, K)`` that are
    not ``ignore_index`` are not counted and raise ValueError: at once for tensors on the
    CPU (the interpreter), for CUDA tensors at the next presence call after the kernel
    has finished, or at :func:`check_label_errors` (no device synchronisation)."""
    check_label_args(labels, num_classes, "class_counts")
    B = labels.shape[0]
    N = labels[0].numel()
    if N >= 2**31 - 2**16:
        raise ValueError(f"class_counts on CUDA supports fewer than 2^31 - 2^16 voxels per image; got {N}")
    if triton.cdiv(num_classes, COUNT_CLASSES) > 65535:
        raise ValueError(f"class_counts on CUDA supports up to {65535 * COUNT_CLASSES} classes; got {num_classes}")
    capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        check_label_errors(wait=False)
    flat = labels.reshape(B, N).contiguous()
    counts = torch.zeros((B, num_classes), dtype=torch.int64, device=labels.device)
    first_bad = torch.full((B,), N, dtype=torch.int64, device=labels.device)
    C = triton.cdiv(N, COUNT_BLOCK)
    k_block = min(COUNT_CLASSES, triton.next_power_of_2(num_classes))
    with _device_guard(labels):
        _counts_kernel[(B * C, triton.cdiv(num_classes, k_block))](
            flat, counts, first_bad, N, C, num_classes, ignore_index, K_BLOCK=k_block, BLOCK=COUNT_BLOCK,
            num_warps=COUNT_WARPS, maxnreg=MAX_REGISTERS,
        )
        if capturing:  # no host check inside a CUDA graph: a bad label is a device-side assert
            torch._assert_async((first_bad == N).all(), "class_counts: a label is outside [0, num_classes)")
            return counts
        if labels.is_cuda:
            host = torch.empty((B,), dtype=torch.int64, pin_memory=True)
            host.copy_(first_bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            check = _LabelCheck(event.query, event.synchronize, host, labels, num_classes, ignore_index)
        else:
            check = _LabelCheck(lambda: True, lambda: None, first_bad, labels, num_classes, ignore_index)
    with _pending_lock:
        _pending.append(check)
        oldest = _pending[0] if len(_pending) > MAX_PENDING else None
    if oldest is not None:
        oldest.wait()
    check_label_errors(wait=False)
    return counts


# --------------------------------------------------------------------------------------
# What the launchers compile, for the ahead-of-time compile test
# --------------------------------------------------------------------------------------
def compile_variants() -> list[dict]:
    """Every (kernel, specialisation, launch options) the launchers above can produce, for
    representative class counts (K = 12; 1 and MAX_CLASSES, the tile extremes; N = 1, which
    Triton turns into a constant): ``dict(name, kernel, signature, constexprs, num_warps,
    maxnreg)``, ready for ``triton.compile(triton.compiler.ASTSource(kernel, signature,
    constexprs), options=...)``.
    Float parameters take their annotation (float64) as a launch would."""
    variants = []

    def add(name, kernel, pointers, constexprs, num_warps, constants=()):
        signature = {}
        for param in kernel.params:
            if param.name in constexprs or param.name in constants:
                signature[param.name] = "constexpr"
            elif param.name in pointers:
                signature[param.name] = pointers[param.name]
            elif param.annotation_type:
                signature[param.name] = param.annotation_type
            elif param.name in ("temperature", "threshold"):  # a Python float, unannotated: fp32
                signature[param.name] = "fp32"
            else:  # Python ints of launch arguments (not 1): i32
                signature[param.name] = "i32"
        values = dict(constexprs)
        values.update({c: 1 for c in constants})
        variants.append(dict(name=name, kernel=kernel, signature=signature, constexprs=values, num_warps=num_warps,
                             maxnreg=MAX_REGISTERS))

    for f64 in (False, True):
        z = "*fp64" if f64 else "*fp32"
        fwd_ptrs = {"z_ptr": z, "mask_ptr": "*u8", "pa_ptr": "*fp64", "pb_ptr": "*fp64", "pi_ptr": "*i64",
                    "pn_ptr": "*i64"}
        bwd_ptrs = {"grad_ptr": z, "z_ptr": z, "mask_ptr": "*u8", "stats_ptr": "*fp64", "out_ptr": z}
        for K in (12, 1, MAX_CLASSES):
            cfg = tile_config(K, f64)
            tile = dict(K_BLOCK=cfg.k_block, BLOCK=cfg.block, F64=f64)
            bcfg = tile_config(K, f64, backward=True)
            btile = dict(K_BLOCK=bcfg.k_block, BLOCK=bcfg.block, F64=f64)
            for mode, m in MODES.items():
                for activation, a in ACTIVATIONS.items():
                    if (K != 12 and (mode not in ("max", "noisy_or") or activation != "softmax")) or (
                        mode == "argmax" and activation != "softmax"
                    ):
                        continue
                    tag = f"{mode}-{activation}-K{K}-{'f64' if f64 else 'f32'}"
                    add(f"forward-{tag}", _forward_kernel, fwd_ptrs,
                        dict(MODE=m, ACT=a, HAS_MASK=True, **tile), cfg.num_warps)
                    if mode in ("noisy_or", "smooth_max"):
                        add(f"backward-{tag}", _backward_kernel, bwd_ptrs,
                            dict(MODE=m, ACT=a, HAS_MASK=True, **btile), bcfg.num_warps)
                    if mode == "max" and (activation != "softmax" or K == 12):
                        add(f"max-backward-{activation}-K{K}-{'f64' if f64 else 'f32'}", _max_backward_kernel,
                            bwd_ptrs, dict(ACT=a, K_BLOCK=cfg.k_block, F64=f64), MAX_BACKWARD_WARPS)
        cfg = tile_config(3, f64)
        add(f"forward-noisy_or-softmax-N1-{'f64' if f64 else 'f32'}", _forward_kernel, fwd_ptrs,
            dict(MODE=1, ACT=0, HAS_MASK=False, K_BLOCK=cfg.k_block, BLOCK=cfg.block, F64=f64), cfg.num_warps,
            constants=("N",))
    merge_ptrs = {"pa_ptr": "*fp64", "pb_ptr": "*fp64", "pi_ptr": "*i64", "pn_ptr": "*i64", "presence_ptr": "*fp32",
                  "stats_ptr": "*fp64"}
    for mode, m in MODES.items():
        for has_mask in (True, False) if mode == "smooth_max" else (True,):
            add(f"merge-{mode}-mask{int(has_mask)}", _merge_kernel, merge_ptrs,
                dict(MODE=m, HAS_MASK=has_mask, KB=MERGE_CLASSES, RB=MERGE_CHUNKS), MERGE_WARPS)
    add("merge-smooth_max-N1", _merge_kernel, merge_ptrs,
        dict(MODE=2, HAS_MASK=False, KB=MERGE_CLASSES, RB=MERGE_CHUNKS), MERGE_WARPS, constants=("N",))
    for labels in ("*u8", "*i64"):
        for k_block in (1, COUNT_CLASSES):
            add(f"counts-{labels[1:]}-kb{k_block}", _counts_kernel,
                {"labels_ptr": labels, "counts_ptr": "*i64", "first_bad_ptr": "*i64"},
                dict(K_BLOCK=k_block, BLOCK=COUNT_BLOCK), COUNT_WARPS)
    return variants
