"""Triton kernels of the presence operators (the CUDA implementation of
``mtseg::class_counts``, ``mtseg::soft_presence_forward`` and ``mtseg::soft_presence_backward``).

Same algorithm as the CPU kernels (``csrc/cpu/presence.cpp``): one program per
(image, chunk of voxels) loads the logits of all K classes of its chunk as a
``(K_BLOCK, BLOCK)`` tile, forms the probabilities (max-subtracted softmax or a stable
sigmoid) and ``log(1 - p)`` without cancellation, and reduces each class over the chunk.
Per-chunk partials ``(B, n_chunks, K)`` are merged in float64 by a few torch ops, in
chunk order, so results are deterministic. The backward recomputes the tile from the
input and the ``(B, K, 2)`` statistics. Only ``exp``, ``log`` and arithmetic are used:
no libdevice function, so the interpreter runs these kernels on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.presence import check_label_args, check_soft_presence_args

MODES = {"max": 0, "noisy_or": 1, "smooth_max": 2, "hard": 3}
ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
_TILE = 4096  # elements per program: K_BLOCK * BLOCK


@triton.jit
def _log1m(p):
    # log(1 - p) without cancellation for small p (Goldberg's log1p correction).
    u = 1.0 - p
    safe = tl.where(u == 1.0, 0.5, u)
    return tl.where(u == 1.0, -p, tl.log(safe) * (-p / (safe - 1.0)))


@triton.jit
def _tile(z_ptr, mask_ptr, b, c, K, N, ACT: tl.constexpr, HAS_MASK: tl.constexpr, EXTRA: tl.constexpr,
          K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """Probabilities p, validity and, by EXTRA, log(1 - p) (1) or 1 - p (2) of one
    (K_BLOCK, BLOCK) tile, both without cancellation."""
    ks = tl.arange(0, K_BLOCK)
    xs = c * BLOCK + tl.arange(0, BLOCK)
    kin = ks < K
    xin = xs < N
    inside = kin[:, None] & xin[None, :]
    offs = b.to(tl.int64) * K * N + ks[:, None].to(tl.int64) * N + xs[None, :]
    if ACT == 0:
        z = tl.load(z_ptr + offs, mask=inside, other=float("-inf"))
    else:
        z = tl.load(z_ptr + offs, mask=inside, other=0.0)
    if F64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    # Padding columns hold 0 (not -inf) so that they stay finite; they are masked out below.
    z = tl.where(xin[None, :], z, tl.where(kin[:, None], 0.0, z))
    if ACT == 0:
        zmax = tl.max(z, axis=0)
        winner = tl.argmax(z, axis=0, tie_break_left=True)
        e = tl.where(kin[:, None], tl.exp(z - zmax[None, :]), 0.0)
        is_winner = ks[:, None] == winner[None, :]
        others = tl.sum(tl.where(is_winner, 0.0, e), axis=0)
        inv = 1.0 / (1.0 + others)
        p = e * inv[None, :]
        if EXTRA == 1:
            rest = tl.log(others * inv)
            extra = tl.where(is_winner, rest[None, :], _log1m(p))
        elif EXTRA == 2:
            extra = tl.where(is_winner, (others * inv)[None, :], 1.0 - p)
        else:
            extra = p  # unused
    elif ACT == 1:
        a = tl.exp(-tl.abs(z))
        p = tl.where(z >= 0, 1.0, a) / (1.0 + a)
        if EXTRA == 2:
            extra = tl.where(z >= 0, a, 1.0) / (1.0 + a)
        elif EXTRA == 1:
            u = 1.0 + a
            log1p_a = tl.where(u == 1.0, a, tl.log(u) * (a / tl.where(u == 1.0, 1.0, u - 1.0)))
            extra = -(tl.maximum(z, 0.0) + log1p_a)
        else:
            extra = p  # unused
    else:
        p = z
        if EXTRA == 1:
            extra = _log1m(p)
        elif EXTRA == 2:
            extra = 1.0 - p
        else:
            extra = p  # unused
    valid = xin
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b.to(tl.int64) * N + xs, mask=xin, other=0) != 0)
    valid2 = kin[:, None] & valid[None, :]
    return z, p, extra, valid2, ks, kin, xs, offs, inside


@triton.jit
def _forward_kernel(z_ptr, mask_ptr, part_a_ptr, part_b_ptr, part_i_ptr, K, N, C, temperature, threshold,
                    MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, K_BLOCK: tl.constexpr,
                    BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // C
    c = pid % C
    # noisy-or needs log(1 - p), max the complement 1 - p (to break rounding ties near 1)
    z, p, extra, valid2, ks, kin, xs, offs, inside = _tile(z_ptr, mask_ptr, b, c, K, N, ACT, HAS_MASK,
                                                           1 if MODE == 1 else (2 if MODE == 0 else 0),
                                                           K_BLOCK, BLOCK, F64)
    out = pid.to(tl.int64) * K + ks
    if MODE == 0:  # max: value (NaN if one was seen), index, complement; near-1 ties by 1 - p
        v = tl.where(valid2, p, -1.0)
        best = tl.max(v, axis=1)
        cand = tl.where(valid2 & (v == best[:, None]), extra, 2.0)
        where = tl.argmin(cand, axis=1, tie_break_left=True)
        best_c = tl.min(cand, axis=1)
        nan = tl.sum(tl.where(valid2 & (p != p), 1, 0), axis=1)
        best = tl.where(nan > 0, float("nan"), best)
        tl.store(part_a_ptr + out, best.to(tl.float64), mask=kin)
        tl.store(part_b_ptr + out, best_c.to(tl.float64), mask=kin)
        tl.store(part_i_ptr + out, (c * BLOCK + where).to(tl.int64), mask=kin)
    elif MODE == 1:  # noisy-or: sum of finite log(1 - p), count of -inf
        lv = tl.where(valid2, extra, 0.0)
        inf = lv == float("-inf")
        tl.store(part_a_ptr + out, tl.sum(tl.where(inf, 0.0, lv), axis=1).to(tl.float64), mask=kin)
        tl.store(part_b_ptr + out, tl.sum(tl.where(inf, 1.0, 0.0), axis=1).to(tl.float64), mask=kin)
    elif MODE == 2:  # smooth max: chunk max m and sum exp((p - m) / T)
        m = tl.max(tl.where(valid2, p, float("-inf")), axis=1)
        nan = tl.sum(tl.where(valid2 & (p != p), 1, 0), axis=1)
        safe_m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.where(valid2, tl.exp((p - safe_m[:, None]) / temperature), 0.0), axis=1)
        m = tl.where(nan > 0, float("nan"), m)
        tl.store(part_a_ptr + out, m.to(tl.float64), mask=kin)
        tl.store(part_b_ptr + out, s.to(tl.float64), mask=kin)
    else:  # hard: any p > threshold
        hit = tl.max(tl.where(valid2 & (p > threshold), 1.0, 0.0), axis=1)
        tl.store(part_a_ptr + out, hit.to(tl.float64), mask=kin)


@triton.jit
def _backward_kernel(grad_ptr, z_ptr, mask_ptr, stat_a_ptr, stat_b_ptr, out_ptr, K, N, C, temperature,
                     MODE: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, K_BLOCK: tl.constexpr,
                     BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // C
    c = pid % C
    z, p, logq, valid2, ks, kin, xs, offs, inside = _tile(z_ptr, mask_ptr, b, c, K, N, ACT, HAS_MASK,
                                                          1 if MODE == 1 else 0, K_BLOCK, BLOCK, F64)
    bk = b.to(tl.int64) * K + ks
    g = tl.load(grad_ptr + bk, mask=kin, other=0.0)
    sa = tl.load(stat_a_ptr + bk, mask=kin, other=0.0)
    sb = tl.load(stat_b_ptr + bk, mask=kin, other=1.0)
    if F64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
        sa = sa.to(tl.float32)
        sb = sb.to(tl.float32)
    if MODE == 1:  # d/dp_x of 1 - prod(1 - p) = exp(S - log(1 - p_x)), one p = 1 handled apart
        finite = tl.where(logq == float("-inf"), 0.0, logq)
        d = tl.where(sb[:, None] == 0, tl.exp(sa[:, None] - finite),
                     tl.where((sb[:, None] == 1) & (logq == float("-inf")), tl.exp(sa[:, None]), 0.0))
    else:  # smooth max: exp((p_x - m) / T) / s
        d = tl.exp((p - sa[:, None]) / temperature) / sb[:, None]
    G = tl.where(valid2, g[:, None] * d, 0.0)
    if ACT == 0:
        dot = tl.sum(tl.where(kin[:, None], p * G, 0.0), axis=0)
        dz = p * (G - dot[None, :])
    elif ACT == 1:
        a = tl.exp(-tl.abs(z))
        q = tl.where(z >= 0, a, 1.0) / (1.0 + a)
        dz = G * p * q
    else:
        dz = G
    tl.store(out_ptr + offs, dz.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _counts_kernel(labels_ptr, part_ptr, N, C, K, ignore_index, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid // C
    c = pid % C
    xs = c * BLOCK + tl.arange(0, BLOCK)
    lab = tl.load(labels_ptr + b.to(tl.int64) * N + xs, mask=xs < N, other=ignore_index).to(tl.int64)
    ks = kb * K_BLOCK + tl.arange(0, K_BLOCK)
    hits = tl.sum(tl.where((lab[None, :] == ks[:, None]) & (lab[None, :] != ignore_index), 1, 0), axis=1)
    tl.store(part_ptr + pid.to(tl.int64) * K + ks, hits.to(tl.int64), mask=ks < K)


def _blocks(K: int) -> tuple[int, int]:
    k_block = triton.next_power_of_2(K)
    if k_block > _TILE // 16:
        raise ValueError(f"soft_presence on CUDA supports up to {_TILE // 16} classes; got K = {K}")
    return k_block, max(16, _TILE // k_block)


def _layout(input: Tensor, valid_mask: Tensor | None):
    B, K = input.shape[:2]
    N = input[0, 0].numel()
    z = input.contiguous()
    mask = None if valid_mask is None else valid_mask.contiguous().view(torch.uint8)
    return z, mask, B, K, N


def soft_presence_forward(
    input: Tensor, mode: str, activation: str, temperature: float, threshold: float, valid_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Launcher of the forward: ``(presence (B, K), stats (B, K, 2) float64)``, as the CPU op."""
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence")
    z, mask, B, K, N = _layout(input, valid_mask)
    k_block, block = _blocks(K)
    C = triton.cdiv(N, block)
    f64 = input.dtype == torch.float64
    a = torch.zeros((B, C, K), dtype=torch.float64, device=input.device)
    bb = torch.zeros_like(a)
    idx = torch.full((B, C, K), -1, dtype=torch.int64, device=input.device)
    _forward_kernel[(B * C,)](
        z, mask if mask is not None else z, a, bb, idx, K, N, C, float(temperature), float(threshold),
        MODE=MODES[mode], ACT=ACTIVATIONS[activation], HAS_MASK=mask is not None, K_BLOCK=k_block, BLOCK=block,
        F64=f64,
    )
    if mask is None:
        n = torch.full((B, C), 0.0, dtype=torch.float64, device=input.device)
        n += block
        n[:, -1] = N - (C - 1) * block
    else:
        n = torch.nn.functional.pad(mask.reshape(B, N), (0, C * block - N)).reshape(B, C, block).sum(2).double()
    presence, stats = _merge(mode, temperature, a, bb, idx, n)
    return presence.to(torch.float64 if f64 else torch.float32), stats


def _merge(mode: str, temperature: float, a: Tensor, b: Tensor, idx: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Merges per-chunk partials (B, C, K) into presence and statistics, in float64."""
    has_voxels = (n > 0).unsqueeze(2)
    n_total = n.sum(1).unsqueeze(1)  # (B, 1)
    stats = torch.zeros(a.shape[0], a.shape[2], 2, dtype=torch.float64, device=a.device)
    if mode == "max":
        nan = a.isnan().any(1)
        value = torch.where(has_voxels & ~a.isnan(), a, -1.0)
        best = value.amax(1)
        # among chunks holding the best value, the smallest complement (first on exact ties)
        cand = torch.where(value == best.unsqueeze(1), b, 2.0)
        chunk = cand.argmin(1, keepdim=True)
        index = torch.where(best >= 0, idx.gather(1, chunk).squeeze(1), -1)
        presence = torch.where(best >= 0, best, 0.0)
        presence = torch.where(nan, float("nan"), presence)
        stats[..., 0] = index.double()
        stats[..., 1] = torch.where(best >= 0, cand.gather(1, chunk).squeeze(1), 1.0)
    elif mode == "noisy_or":
        S, count = a.sum(1), b.sum(1)
        presence = torch.where(count > 0, 1.0, -torch.expm1(S))
        presence = torch.where(S.isnan(), float("nan"), presence)
        stats[..., 0], stats[..., 1] = S, count
    elif mode == "smooth_max":
        m = torch.where(b > 0, a, float("-inf"))
        m = torch.where(a.isnan(), float("nan"), m)
        top = m.amax(1)  # NaN propagates
        safe_top = torch.where(top.isfinite(), top, 0.0)
        s = torch.where(b > 0, b * torch.exp((m - safe_top.unsqueeze(1)) / temperature), 0.0).sum(1)
        presence = torch.where(n_total > 0, top + temperature * (torch.log(s) - torch.log(n_total)), 0.0)
        stats[..., 0], stats[..., 1] = top, s
    else:
        presence = a.amax(1)
    return presence, stats


def _max_backward(grad: Tensor, input: Tensor, stats: Tensor, activation: str) -> Tensor:
    """max: each (image, class) gradient lands on its arg-max voxel; K x K work per image."""
    B, K = input.shape[:2]
    x = input.reshape(B, K, -1).to(grad.dtype)
    index = stats[..., 0].long()  # (B, K)
    hit = index >= 0
    at = index.clamp(min=0).unsqueeze(1).expand(B, K, K)  # [b, j, k] -> voxel of class k
    z = x.gather(2, at)  # z[b, j, k] = logit of class j at the arg-max voxel of class k
    g = torch.where(hit, grad, 0.0)
    if activation == "softmax":
        p = torch.softmax(z, dim=1)
        diag = torch.diagonal(p, dim1=1, dim2=2)  # p_k at its own voxel
        eye = torch.eye(K, dtype=torch.bool, device=p.device)
        # dp_k/dz_j = p_k (delta_jk - p_j); 1 - p_k from the other classes (exact near p_k = 1)
        z64 = z.double()
        rest = torch.exp(torch.logsumexp(z64.masked_fill(eye, float("-inf")), 1) - torch.logsumexp(z64, 1))
        contrib = (g * diag).unsqueeze(1) * torch.where(eye, rest.to(p.dtype).unsqueeze(1), -p)
    else:
        zk = torch.diagonal(z, dim1=1, dim2=2)
        local = torch.sigmoid(zk) * torch.sigmoid(-zk) if activation == "sigmoid" else torch.ones_like(zk)
        contrib = torch.diag_embed(g * local)
    return torch.zeros_like(x).scatter_add_(2, at, contrib).reshape(input.shape)


def soft_presence_backward(
    grad: Tensor,
    input: Tensor,
    stats: Tensor,
    mode: str,
    activation: str,
    temperature: float,
    valid_mask: Tensor | None,
) -> Tensor:
    """Launcher of the backward: ``dLoss/dinput`` from ``dLoss/dpresence (B, K)``."""
    check_soft_presence_args(input, mode, activation, temperature, valid_mask, "soft_presence_backward")
    if mode == "hard":
        raise ValueError("soft_presence_backward: mode 'hard' has no gradient")
    work = torch.float64 if input.dtype == torch.float64 else torch.float32
    if mode == "max":
        return _max_backward(grad.to(work), input, stats, activation).to(input.dtype)
    z, mask, B, K, N = _layout(input, valid_mask)
    k_block, block = _blocks(K)
    C = triton.cdiv(N, block)
    out = torch.empty_like(z)
    g = grad.to(work).contiguous()
    sa, sb = stats[..., 0].contiguous(), stats[..., 1].contiguous()
    _backward_kernel[(B * C,)](
        g, z, mask if mask is not None else z, sa, sb, out, K, N, C, float(temperature),
        MODE=MODES[mode], ACT=ACTIVATIONS[activation], HAS_MASK=mask is not None, K_BLOCK=k_block, BLOCK=block,
        F64=input.dtype == torch.float64,
    )
    return out


def class_counts(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Launcher of the voxel counts ``(B, K)`` int64; raises on a label outside ``[0, K)``."""
    check_label_args(labels, num_classes, "class_counts")
    B = labels.shape[0]
    flat = labels.reshape(B, -1)
    N = flat.shape[1]
    kept = flat != ignore_index
    bad = kept & ((flat < 0) | (flat >= num_classes))
    if bool(bad.any()):  # one device sync: the error must name the value
        position = int(bad.reshape(-1).to(torch.uint8).argmax())
        raise ValueError(
            f"class_counts: image {position // N} holds the label {int(flat.reshape(-1)[position])} (at flat voxel "
            f"index {position % N}); expected values in [0, {num_classes}) or ignore_index = {ignore_index}"
        )
    k_block = min(64, triton.next_power_of_2(num_classes))
    block = 1024
    C = triton.cdiv(N, block)
    part = torch.empty((B * C, num_classes), dtype=torch.int64, device=labels.device)
    _counts_kernel[(B * C, triton.cdiv(num_classes, k_block))](
        flat.contiguous(), part, N, C, num_classes, ignore_index, K_BLOCK=k_block, BLOCK=block
    )
    return part.reshape(B, C, num_classes).sum(1)


_lib = torch.library.Library("mtseg", "IMPL")
_lib.impl("soft_presence_forward", soft_presence_forward, "CUDA")
_lib.impl("soft_presence_backward", soft_presence_backward, "CUDA")
_lib.impl("class_counts", class_counts, "CUDA")
