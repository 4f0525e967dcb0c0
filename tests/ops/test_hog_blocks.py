"""Block normalisation of ``mtseg_kernels.hog_blocks`` (forward and backward).

Oracles, none of which shares code with the kernels:

* scikit-image's own ``_hog_normalize_block``, called block by block (the semantics);
* the exact quotients in 50-digit ``decimal`` arithmetic (float64 results must be within
  a few ulp of them);
* torch autograd through a float64 transcription of skimage's formulas, and gradcheck;
* hog.h's per-block ``normalize_block`` / ``normalize_block_backward`` (what the CUDA
  kernels run, each block's norm recomputed from its cells), compiled as a scalar
  program: the CPU operator, which caches each cell's part of the norm and runs
  vectorised, must give the same bits.
"""

from __future__ import annotations

import subprocess
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from hog_testing import compile_header_probe
from skimage.feature._hog import _hog_normalize_block

import mtseg_kernels as mk

NORMS = ["L1", "L1-sqrt", "L2", "L2-Hys"]
NORM_CODE = {"L1": 0, "L1-sqrt": 1, "L2": 2, "L2-Hys": 3}  # hog.h's BlockNorm
EPS = 1e-5
# (n_cells_row, n_cells_col, orientations, cells_per_block): block rows of 1 to 36 values,
# so every remainder modulo the 8 summation lanes occurs, and the presets' shapes.
SHAPES = [
    (5, 6, 9, (3, 3)),
    (4, 5, 6, (2, 2)),
    (6, 4, 13, (2, 3)),
    (3, 7, 1, (1, 1)),
    (4, 6, 5, (1, 4)),
    (5, 5, 4, (3, 1)),
    (3, 3, 7, (3, 3)),
    (4, 4, 16, (2, 2)),
]


def _cells(shape, dtype, seed, batch=2, zeros=0.3):
    """Seeded non-negative cells with exact zeros, some empty cells and a wide range of values."""
    ncr, ncc, n, _ = shape
    rng = np.random.default_rng(seed)
    v = rng.random((batch, ncr, ncc, n)) ** 3 * rng.choice([1e-3, 1.0, 30.0], size=(batch, ncr, ncc, 1))
    v[rng.random(v.shape) < zeros] = 0.0
    v[0, 0, 0] = 0.0  # an empty cell
    return torch.from_numpy(v).to(dtype)


def _seed(shape, norm) -> int:
    return SHAPES.index(shape) * len(NORMS) + NORMS.index(norm)


def _skimage_blocks(cells: np.ndarray, cpb, norm: str) -> np.ndarray:
    """(B, nbr, nbc, br, bc, n) from skimage's _hog_normalize_block on every block."""
    b, ncr, ncc, n = cells.shape
    br, bc = cpb
    out = np.empty((b, ncr - br + 1, ncc - bc + 1, br, bc, n), dtype=cells.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(b):
            for r in range(ncr - br + 1):
                for c in range(ncc - bc + 1):
                    out[i, r, c] = _hog_normalize_block(cells[i, r : r + br, c : c + bc, :], norm)
    return out


def _exact_block(block: np.ndarray, norm: str) -> list[Decimal]:
    """One block normalised in 50-digit decimal arithmetic from its exact float values."""
    with localcontext() as ctx:
        ctx.prec = 50
        v = [Decimal(float(x)) for x in block.ravel()]
        eps = Decimal(EPS)  # the float 1e-5, as the kernels and skimage use it
        if norm in ("L1", "L1-sqrt"):
            d = sum(abs(x) for x in v) + eps
            out = [x / d for x in v]
            return [x.sqrt() for x in out] if norm == "L1-sqrt" else out
        n1 = (sum(x * x for x in v) + eps * eps).sqrt()
        out = [x / n1 for x in v]
        if norm == "L2":
            return out
        clip = Decimal(0.2)
        out = [min(x, clip) for x in out]
        n2 = (sum(x * x for x in out) + eps * eps).sqrt()
        return [x / n2 for x in out]


def _torch_blocks(cells: torch.Tensor, cpb, norm: str) -> torch.Tensor:
    """skimage's formulas in float64 torch ops, for autograd."""
    br, bc = cpb
    w = cells.unfold(1, br, 1).unfold(2, bc, 1)  # (B, nbr, nbc, n, br, bc)
    v = w.permute(0, 1, 2, 4, 5, 3)
    axes = (3, 4, 5)
    if norm == "L1":
        return v / (v.abs().sum(axes, keepdim=True) + EPS)
    if norm == "L1-sqrt":
        return torch.sqrt(v / (v.abs().sum(axes, keepdim=True) + EPS))
    o = v / torch.sqrt((v * v).sum(axes, keepdim=True) + EPS**2)
    if norm == "L2":
        return o
    o = torch.minimum(o, torch.tensor(0.2, dtype=o.dtype))
    return o / torch.sqrt((o * o).sum(axes, keepdim=True) + EPS**2)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{s[3][0]}x{s[3][1]}")
def test_forward_matches_skimage_normalize_block(shape, norm):
    cpb = shape[3]
    cells = _cells(shape, torch.float64, seed=_seed(shape, norm))
    got = mk.hog_blocks(cells, cpb, norm).numpy()
    expected = _skimage_blocks(cells.numpy(), cpb, norm)
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{s[3][0]}x{s[3][1]}")
def test_float32_forward_is_the_rounded_float64_result(shape, norm):
    """float32 cells give the float64 result (of the same values) rounded to float32."""
    cpb = shape[3]
    cells = _cells(shape, torch.float32, seed=7)
    got = mk.hog_blocks(cells, cpb, norm)
    assert got.dtype == torch.float32
    expected = _skimage_blocks(cells.double().numpy(), cpb, norm)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1.2e-7, atol=1e-38)


@pytest.mark.parametrize("norm", NORMS)
def test_forward_within_few_ulp_of_exact(norm):
    """Each float64 value is within 4 ulp of the exact quotient (one reciprocal per
    block instead of a division per value costs at most ~2 ulp)."""
    shape = (4, 5, 9, (2, 3))
    cells = _cells(shape, torch.float64, seed=11, batch=1)
    got = mk.hog_blocks(cells, shape[3], norm)[0].numpy()
    c = cells[0].numpy()
    worst = 0.0
    for r in range(got.shape[0]):
        for col in range(got.shape[1]):
            exact = _exact_block(c[r : r + 2, col : col + 3], norm)
            for g, e in zip(got[r, col].ravel(), exact):
                ulp = np.spacing(abs(float(e))) if e != 0 else np.finfo(np.float64).tiny
                worst = max(worst, float(abs(Decimal(float(g)) - e)) / ulp)
    assert worst <= 4.0, f"{worst} ulp"


@pytest.mark.parametrize("norm", NORMS)
def test_extreme_cells_follow_skimage(norm):
    """Overflowing squares, Inf and NaN cells give skimage's values (0, NaN) per block."""
    cells = _cells((4, 5, 6, (2, 2)), torch.float64, seed=3, batch=1)
    cells[0, 0, 1, 2] = 1e200  # its square overflows: the L2 norms are Inf
    cells[0, 2, 4, 0] = float("inf")
    cells[0, 3, 0, 5] = float("nan")
    got = mk.hog_blocks(cells, (2, 2), norm).numpy()
    expected = _skimage_blocks(cells.numpy(), (2, 2), norm)
    assert np.isnan(expected).any() and (~np.isnan(expected)).any()
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-300, equal_nan=True)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_blocks_are_zero_with_zero_gradient(norm, dtype):
    cells = torch.zeros(1, 3, 4, 6, dtype=dtype)
    out = mk.hog_blocks(cells, (2, 2), norm)
    assert out.shape == (1, 2, 3, 2, 2, 6) and (out == 0).all()
    grad = torch.ops.mtseg.hog_blocks_backward(torch.ones_like(out), cells, [2, 2], norm)
    # d(v / (|v| + eps)) / dv at v = 0 is 1 / eps per block holding the cell (L1, L2);
    # L2-Hys: 1 / eps^2 (two normalisations, both by eps, no clip); L1-sqrt takes 0 there
    # (sqrt is not differentiable at 0).
    holding = torch.tensor([[1, 2, 2, 1], [1, 2, 2, 1], [1, 2, 2, 1]], dtype=dtype)
    holding = holding * torch.tensor([[1], [2], [1]], dtype=dtype)  # blocks per cell
    expected = {"L1": 1 / EPS, "L1-sqrt": 0.0, "L2": 1 / EPS, "L2-Hys": 1 / EPS**2}[norm]
    torch.testing.assert_close(grad[0], (holding * expected)[..., None].expand(3, 4, 6), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------
# Determinism: the same bits as hog.h's scalar per-block code, at any thread count
# --------------------------------------------------------------------------------------
PROBE_SOURCE = Path(__file__).with_name("hog_blocks_probe.cpp")


@pytest.fixture(scope="module")
def blocks_probe(tmp_path_factory) -> Path:
    """hog_blocks_probe.cpp compiled without vectorisation against csrc/include."""
    return compile_header_probe(PROBE_SOURCE, tmp_path_factory.mktemp("hog_blocks_probe"), "-fno-tree-vectorize")


def _probe(exe: Path, direction: str, cells: torch.Tensor, cpb, norm: str, grad=None) -> np.ndarray:
    b, ncr, ncc, n = cells.shape
    kind = "f32" if cells.dtype == torch.float32 else "f64"
    values = [cells.double().flatten()] + ([grad.double().flatten()] if grad is not None else [])
    text = f"{direction} {kind} {NORM_CODE[norm]} {b} {ncr} {ncc} {n} {cpb[0]} {cpb[1]}\n"
    text += "\n".join(float(x).hex() for v in values for x in v.tolist())
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split()
    return np.array([float.fromhex(x) for x in out])


def _bits(t: torch.Tensor) -> np.ndarray:
    a = t.detach().contiguous().numpy().ravel()
    return a.view(np.int32 if a.dtype == np.float32 else np.int64)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bits_equal_header_per_block_code(blocks_probe, norm, dtype):
    for shape in SHAPES[:5]:
        cpb = shape[3]
        cells = _cells(shape, dtype, seed=5)
        out = mk.hog_blocks(cells, cpb, norm)
        ref = torch.from_numpy(_probe(blocks_probe, "fwd", cells, cpb, norm)).to(dtype).reshape(out.shape)
        np.testing.assert_array_equal(_bits(out), _bits(ref), err_msg=f"forward {shape}")
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        gblocks = _probe(blocks_probe, "bwd", cells, cpb, norm, grad)
        # The probe gives each block's input gradient; the cell's is their sum over the
        # blocks holding it, in hog.h's order (gather_cell_gradient: i, then j, ascending).
        b, ncr, ncc, n = cells.shape
        br, bc = cpb
        gblocks = gblocks.reshape(b, ncr - br + 1, ncc - bc + 1, br, bc, n)
        expected = np.zeros(cells.shape)
        for r in range(ncr):
            for c in range(ncc):
                acc = np.zeros((b, n))
                for i in range(br):
                    for j in range(bc):
                        if 0 <= r - i < ncr - br + 1 and 0 <= c - j < ncc - bc + 1:
                            acc = acc + gblocks[:, r - i, c - j, i, j, :].astype(np.float64)
                expected[:, r, c, :] = acc
        got = torch.ops.mtseg.hog_blocks_backward(grad, cells, list(cpb), norm)
        np.testing.assert_array_equal(_bits(got), _bits(torch.from_numpy(expected).to(dtype)),
                                      err_msg=f"backward {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_at_any_thread_count(dtype):
    cells = _cells((40, 48, 9, (3, 3)), dtype, seed=9, batch=3)
    grad = torch.randn(3, 38, 46, 3, 3, 9, generator=torch.Generator().manual_seed(2), dtype=dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([(mk.hog_blocks(cells, (3, 3), norm),
                             torch.ops.mtseg.hog_blocks_backward(grad, cells, [3, 3], norm)) for norm in NORMS])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for (f0, b0), (f1, b1) in zip(results[0], other):
            assert torch.equal(_bits_t(f0), _bits_t(f1)) and torch.equal(_bits_t(b0), _bits_t(b1))


def _bits_t(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{s[3][0]}x{s[3][1]}")
def test_backward_matches_autograd(shape, norm):
    cpb = shape[3]
    # L1-sqrt's derivative is infinite at 0: positive cells there; zeros elsewhere.
    zeros = 0.0 if norm == "L1-sqrt" else 0.3
    cells = _cells(shape, torch.float64, seed=_seed(shape, norm) + 100, zeros=zeros)
    if norm == "L1-sqrt":
        cells[0, 0, 0] = 0.5
    cells.requires_grad_()
    out = mk.hog_blocks(cells, cpb, norm)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (got,) = torch.autograd.grad((out * upstream).sum(), cells)
    (expected,) = torch.autograd.grad((_torch_blocks(cells, cpb, norm) * upstream).sum(), cells)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_float32_backward_matches_float64():
    shape = (5, 6, 9, (3, 3))
    cells = _cells(shape, torch.float32, seed=4, zeros=0.0) + 0.01
    upstream = torch.randn(1, 3, 4, 3, 3, 9, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1, -1, -1)
    for norm in NORMS:
        got = torch.ops.mtseg.hog_blocks_backward(upstream, cells, [3, 3], norm)
        assert got.dtype == torch.float32
        ref = torch.ops.mtseg.hog_blocks_backward(upstream.double(), cells.double(), [3, 3], norm)
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("cpb", [(3, 3), (1, 2), (2, 1)])
def test_gradcheck(cpb):
    cells = (_cells((4, 4, 9, cpb), torch.float64, seed=6, batch=1, zeros=0.0) + 0.05).requires_grad_()
    for norm in NORMS:
        assert torch.autograd.gradcheck(lambda c, n=norm: mk.hog_blocks(c, cpb, n), (cells,))
