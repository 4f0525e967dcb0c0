"""Shared pieces of the raw-op fuzzers: hostile tensors, hostile scalars, and the verdict.

Every fuzzer calls ``torch.ops.mtseg.<op>`` directly (no Python wrapper checks) and
accepts exactly two outcomes:

* a ``ValueError`` / ``TypeError`` / ``RuntimeError`` / ``NotImplementedError`` whose
  message names the operator or one of its arguments (:func:`call`), or
* a result, which the fuzzer then checks against an independent oracle (the
  references in ``mtseg_kernels/reference``, scipy) or the op's documented properties.

A crash (segfault, abort, sanitizer report) kills the pytest process and fails the run.

Examples are derived from the test's name (``derandomize=True``), so CI sees the same
inputs every run. ``MTSEG_FUZZ_EXAMPLES`` sets the number of examples per fuzzer
(default :data:`DEFAULT_EXAMPLES`, kept small so that ``make test`` and ``make sanitize``
stay fast); ``make fuzz`` runs a long search with a larger count and random seeds.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import event as _event
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

DEFAULT_EXAMPLES = 40
EXAMPLES = int(os.environ.get("MTSEG_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
# `make fuzz` sets MTSEG_FUZZ_RANDOM=1: fresh random inputs each run instead of the fixed ones.
DERANDOMIZE = os.environ.get("MTSEG_FUZZ_RANDOM", "0") in ("", "0")

fuzz_settings = settings(
    max_examples=EXAMPLES,
    derandomize=DERANDOMIZE,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError)

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ALL_DTYPES = [torch.bool, *INT_DTYPES, *FLOAT_DTYPES, torch.complex64]

LAYOUTS = ("contiguous", "transposed", "expanded", "sliced", "overlapping")

# Floats at and beyond every limit an op could trip over.
HOSTILE_FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e-45, -1e-300, 1e300, -1e300, 1.7976931348623157e308,
    3.4e38, 1e19, 1e20, math.inf, -math.inf, math.nan, 2.0**31, 2.0**63,
]
# Ints at and beyond int32 / int64 limits.
HOSTILE_INTS = [0, 1, -1, 2, 3, 7, 2**15, 2**31 - 1, 2**31, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63), 10**9]


def op_names() -> set[str]:
    """Every operator of the ``mtseg`` namespace, from torch's schema registry."""
    return {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("mtseg::")}


def arg_names(op: str) -> list[str]:
    schema = getattr(torch.ops.mtseg, op).default._schema
    return [a.name for a in schema.arguments]


def _words_for(op: str) -> list[str]:
    # The public name too: the private emulations report as the op they emulate, the
    # forward of soft_presence as soft_presence.
    public = op.removeprefix("_").removesuffix("_emulated").removesuffix("_forward")
    return [op, public, *arg_names(op)]


def event(value: str) -> None:
    if currently_in_test_context():
        _event(value)


def _clear(op: str, exc: BaseException) -> None:
    msg = str(exc)
    words = _words_for(op)
    named = any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9])", msg) for w in words)
    assert named, f"{op}: {type(exc).__name__} that names neither the op nor an argument {words}: {msg[:600]}"


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def _results(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def call(op: str, *args, meta: bool = True):
    """``torch.ops.mtseg.<op>(*args)``: the result, or ``None`` after a clear error.

    A clear error is one of :data:`ALLOWED_ERRORS` whose message names the op or one of
    its arguments (as a word); anything else fails the test with the message.

    With ``meta``, the same call on meta tensors (the fake kernels ``torch.compile``
    traces with) must agree: where the real op returns, the fake returns the same shapes
    and dtypes; where the fake raises, the real op raises too (the fake cannot see
    values, so the converse need not hold).
    """
    fake = fake_error = None
    if meta:
        try:
            fake = getattr(torch.ops.mtseg, op)(*map(_on_meta, args))
        except ALLOWED_ERRORS as exc:
            _clear(op, exc)
            fake_error = exc
    try:
        out = getattr(torch.ops.mtseg, op)(*args)
    except ALLOWED_ERRORS as exc:
        # `pytest --hypothesis-show-statistics` shows how often each verdict came up.
        event(f"error: {type(exc).__name__}" + (": " + str(exc)[:90] if os.environ.get("MTSEG_FUZZ_VERBOSE") else ""))
        _clear(op, exc)
        return None
    event("result")
    assert fake_error is None, f"{op}: the fake kernel raised ({fake_error}) where the op returned"
    if meta:
        got, want = _results(fake), _results(out)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], (
            f"{op}: fake kernel gives {[(tuple(t.shape), t.dtype) for t in got]}, "
            f"the op {[(tuple(t.shape), t.dtype) for t in want]}"
        )
    return out


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------
@st.composite
def shapes(draw, min_dims=1, max_dims=5, max_side=6, min_side=0):
    n = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.integers(min_side, max_side)) for _ in range(n))


def _fill(shape, dtype, kind: str, gen: torch.Generator, low: int, high: int) -> torch.Tensor:
    """Values of ``shape`` and ``dtype``: kind 'small' (ints in [low, high), floats ~N(0, 4)),
    'hostile' (floats from HOSTILE_FLOATS mixed with normal ones, ints at their dtype's limits)."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=gen) < 0.5) if n else torch.zeros(shape, dtype=torch.bool)
    if dtype.is_floating_point or dtype.is_complex:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        if kind == "hostile" and n:
            special = torch.tensor(HOSTILE_FLOATS, dtype=torch.float64)
            pick = torch.randint(0, len(HOSTILE_FLOATS), shape, generator=gen)
            x = torch.where(torch.rand(shape, generator=gen) < 0.3, special[pick], x)
        return x.to(dtype)
    info = torch.iinfo(dtype)
    if kind == "hostile" and n:
        edges = torch.tensor([info.min, info.max, 0, 1, -1 if info.min < 0 else 2, low, high], dtype=torch.float64)
        pick = torch.randint(0, len(edges), shape, generator=gen)
        small = torch.randint(max(low, info.min), min(high, info.max) + 1, shape, generator=gen, dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=gen) < 0.3, edges[pick], small)
        # Through int64 (exact for every edge but uint64's max, which saturates).
        return x.clamp(info.min, min(info.max, 2**63 - 1024)).to(torch.int64).to(dtype)
    return torch.randint(max(low, info.min), min(high, info.max) + 1, shape, generator=gen, dtype=torch.int64).to(dtype)


def layout(base_maker, shape, name: str, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` with the memory layout ``name`` (see :data:`LAYOUTS`); values
    from ``base_maker(shape)``. Overlapping views are read-only inputs by construction."""
    nd = len(shape)
    if name == "transposed" and nd >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return base_maker(swapped).transpose(-1, -2)
    if name == "expanded" and nd >= 1:
        d = int(torch.randint(0, nd, (1,), generator=gen))
        one = tuple(1 if i == d else s for i, s in enumerate(shape))
        return base_maker(one).expand(shape)
    if name == "sliced" and nd >= 1:
        wide = (*shape[:-1], 2 * shape[-1] + 1)
        return base_maker(wide)[..., 1::2]
    if name == "overlapping" and nd >= 1 and math.prod(shape) > 0:
        stride = [1] * nd
        need = sum(s - 1 for s in shape) + 1
        flat = base_maker((need,))
        return flat.as_strided(shape, stride)
    return base_maker(shape)


@st.composite
def tensors(draw, shape=None, dtypes=ALL_DTYPES, kinds=("small", "hostile"), layouts=LAYOUTS, low=-3, high=8):
    """A hostile tensor: any shape (zero-size and size-1 dims included), dtype, layout, values."""
    if shape is None:
        shape = draw(shapes())
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(kinds))
    name = draw(st.sampled_from(layouts))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return layout(lambda s: _fill(s, dtype, kind, gen, low, high), tuple(shape), name, gen)


def floats_at_limits():
    """A float argument: ordinary values, or one from :data:`HOSTILE_FLOATS`."""
    return st.one_of(st.sampled_from(HOSTILE_FLOATS), st.floats(-5, 5, allow_nan=False))


def ints_at_limits(low=-3, high=12):
    return st.one_of(st.integers(low, high), st.sampled_from(HOSTILE_INTS), st.sampled_from([-x for x in HOSTILE_INTS]))


@st.composite
def spacings(draw, spatial_dims: int):
    """``None``, the right number of positive floats, a wrong-length list, or hostile values."""
    kind = draw(st.sampled_from(["none", "none", "good", "good", "good", "good", "wrong_length", "hostile"]))
    if kind == "none":
        return None
    if kind == "good":
        return [draw(st.sampled_from([0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 0.7])) for _ in range(spatial_dims)]
    if kind == "wrong_length":
        n = draw(st.sampled_from([0, 1, 2, 3, 4, 5]).filter(lambda n: n != spatial_dims))
        return [1.0] * n
    return [draw(floats_at_limits()) for _ in range(spatial_dims)]


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.double()).all()) if x.numel() else True


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Values as numpy (bfloat16 through float32, exact); torch has few kernels for uint16-64."""
    return (x.float() if x.dtype == torch.bfloat16 else x).detach().cpu().numpy()


def foreground(x: torch.Tensor) -> np.ndarray:
    """Non-zero = foreground (NaN included), as a numpy bool array."""
    return to_numpy(x) != 0


def mostly(good, hostile, p_hostile: float = 0.2):
    """``hostile`` with probability about ``p_hostile``, else ``good``: enough valid calls
    reach the oracle, enough invalid ones reach the checks. (Not ``i < cut``: hypothesis
    draws the bounds 0 and 99 far more often than the values between.)"""
    period = max(2, round(1 / p_hostile))
    return st.integers(0, 99).flatmap(lambda i: hostile if i % period == 1 else good)
