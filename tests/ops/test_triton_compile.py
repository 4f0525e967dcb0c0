"""Every Triton kernel of ``mtseg_kernels/triton`` compiled ahead of time for sm_80 and
sm_90, the way a launch on an A100 / H100 would compile it, without a GPU: Triton
compiles for a ``GPUTarget`` with its bundled ptxas. The tests fail on a compile error,
on register spills (ptxas stack frame or local memory), on an approximate float32
division in the PTX, and on a float parameter that a launch would pass as float32.

The CPU tests run these kernels in Triton's interpreter, which never reaches the
compiler; this is what catches code that only the real compiler rejects (e.g. a float64
'precise' division, which exists only for float32) and resource problems.

The compiles run in two subprocesses (one per architecture) without ``TRITON_INTERPRET``:
the kernels must be real ``JITFunction``\\ s there. Triton caches compiled kernels
(``~/.triton/cache``), so later runs are fast.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ARCHS = (80, 90)

COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mtseg_kernels.triton import presence

arch = int(sys.argv[1])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for v in presence.compile_variants():
    row = {"name": v["name"], "kernel": v["kernel"].__name__, "arch": arch}
    try:
        src = ASTSource(fn=v["kernel"], signature=v["signature"], constexprs=v["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v["num_warps"], "maxnreg": v["maxnreg"], "enable_fp_fusion": False})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        row.update(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]))
        ptx = compiled.asm["ptx"]
        row["approx_div"] = len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx))
        row["f64_params"] = sorted(re.findall(r"\.param \.f64 (\w+)", ptx))
    except Exception as exc:  # reported by the test, with the variant's name
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    print(json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [sys.executable, "-c", COMPILE_SCRIPT, str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )
        for arch in ARCHS
    }
    rows = []
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"the sm_{arch} compile driver failed:\n{err[-4000:]}"
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def jit_kernels():
    """Every Triton kernel (a @triton.jit function named *_kernel) of mtseg_kernels.triton."""
    import mtseg_kernels.triton as pkg

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and callable(getattr(obj, "__getitem__", None)):  # kernel[grid](...)
                found.add(name)
    return found


def test_every_kernel_has_compile_variants(compiled):
    kernels = jit_kernels()
    assert kernels, "no Triton kernel found"
    covered = {row["kernel"] for row in compiled}
    assert kernels <= covered, f"kernels without a variant in compile_variants(): {sorted(kernels - covered)}"
    assert {row["arch"] for row in compiled} == set(ARCHS)


def test_every_variant_compiles(compiled):
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n\n".join(errors)


def test_no_register_spills(compiled):
    table = "\n".join(
        f"{r['name']:<44} sm_{r['arch']} regs {r['regs']:>3} stack {r['stack']:>4} local {r['local']:>4}"
        for r in compiled
        if "error" not in r
    )
    spills = [r for r in compiled if "error" not in r and (r["stack"] or r["local"])]
    assert not spills, "register spills (ptxas stack frame / local memory):\n" + table


def test_divisions_are_correctly_rounded(compiled):
    approx = [f"{r['name']} sm_{r['arch']}: {r['approx_div']}" for r in compiled if r.get("approx_div")]
    assert not approx, "approximate float32 divisions in the PTX:\n" + "\n".join(approx)


def test_temperature_and_threshold_reach_the_kernels_as_float64(compiled):
    # A Python float argument becomes an fp32 kernel parameter unless annotated: float64
    # smooth_max would be off by ~3e-9 and 'hard' would compare with a rounded threshold.
    expected = {"_forward_kernel": 2, "_merge_kernel": 1, "_backward_kernel": 1}
    wrong = [
        f"{r['name']} sm_{r['arch']}: float64 params {r['f64_params']}"
        for r in compiled
        if "error" not in r and r["kernel"] in expected and len(r["f64_params"]) != expected[r["kernel"]]
    ]
    assert not wrong, "\n".join(wrong)
