"""The multi-versioned CPU loops run their whole body in their own instruction set.

A loop marked ``MTSEG_CPU_CLONES`` is compiled once per instruction set (AVX-512, AVX2,
baseline), and its body lives in an always-inline ``*_impl`` function so that each
clone gets its own copy. Anything that body calls out of line (a lambda the compiler
chose not to inline, say) is an ordinary function compiled for the baseline only (SSE2),
whichever clone calls it: the hot loop then silently runs without vectors. That happened
to the HOG block normalisation (its per-block lambda ran in SSE2, 2.4x slower). The
symbol table of the built extension shows it: an ``*_impl`` body or anything defined
inside one has no out-of-line copy when everything was inlined.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import mtseg_kernels._C as extension

# A function scope named *_impl, as the demangler prints it: "..._impl<T>(args)" or
# "..._impl(args)", possibly followed by "::{lambda(...)#1}" etc.
IMPL_SCOPE = re.compile(r"\bmtseg::.*?\w_impl(<[^()]*>)?\(")
CLONE = re.compile(r"\[clone \.(avx512f|avx2|default)\]")


def _symbols() -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed: cannot read the extension's symbols")
    proc = subprocess.run([nm, "-C", "--defined-only", str(Path(extension.__file__))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line.split(" ", 2)[2] for line in proc.stdout.splitlines() if line.count(" ") >= 2]


def out_of_line_impl_symbols(symbols: list[str]) -> list[str]:
    """Symbols that are an ``*_impl`` body, or live inside one, compiled out of line."""
    return [s for s in symbols if IMPL_SCOPE.search(s) and not CLONE.search(s)]


def test_the_pattern_finds_an_out_of_line_lambda():
    # The symbol the SSE2 block lambda had (before MTSEG_LAMBDA_INLINE), and a clone.
    leaked = (
        "mtseg::hog::(anonymous namespace)::blocks_row_impl<float>(float const*, double const*, "
        "mtseg::hog::BlockGeometry const&, mtseg::hog::BlockNorm, long, double*, double*, float*)"
        "::{lambda(long, mtseg::hog::BlockView<double> const&)#1}::operator()(long, "
        "mtseg::hog::BlockView<double> const&) const"
    )
    clone = "mtseg::hog::(anonymous namespace)::blocks_row(float const*) [clone .avx512f]"
    plain = "mtseg::hog::(anonymous namespace)::hog_blocks_cpu(at::Tensor const&)"
    assert out_of_line_impl_symbols([leaked, clone, plain]) == [leaked]


def test_cloned_loop_bodies_are_inlined():
    symbols = _symbols()
    if not any(CLONE.search(s) for s in symbols):
        pytest.skip("the extension has no multi-versioned loops (MTSEG_CPU_CLONES needs GCC on x86-64)")
    leaked = out_of_line_impl_symbols(symbols)
    assert not leaked, (
        "parts of always-inline loop bodies were compiled out of line, i.e. for the baseline "
        "instruction set only (mark the lambda MTSEG_LAMBDA_INLINE):\n" + "\n".join(leaked)
    )
