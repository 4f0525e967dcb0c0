"""Register spills of the CUDA kernels, from the ptxas reports the build keeps.

The parser and the checker are tested on canned reports (real nvcc 13 output, written
by hand into the test), so they run everywhere; the last test checks this tree's CUDA
build and skips where the extension was built without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mtseg_kernels
from build_testing import REPO, load_tool

ptxas_check = load_tool("ptxas_check")
ptxas_log = load_tool("ptxas_log")

# nvcc 13.0, `--resource-usage -maxrregcount=16`, one clean kernel, one that spills and
# calls a non-inlined device function (reported after the entry), one more architecture.
REPORT = """\
ptxas info    : Overriding maximum register limit 256 for '_Z5cleanPf' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_90'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compile time = 2.116 ms
ptxas info    : Compiling entry function '_Z6spillsPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z6spillsPKfPfi
    3864 bytes stack frame, 4860 bytes spill stores, 5316 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 3864 bytes cumulative stack size
ptxas info    : Compile time = 4738.343 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 8 bytes spill stores, 0 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_80'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 352 bytes cmem[0]
"""

CLEAN = """\
ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_90'
ptxas info    : Function properties for _Z1kPfi
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_80'
ptxas info    : Function properties for _Z1kPfi
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 364 bytes cmem[0]
"""

NINJA = "cuda_post_cflags = -O3 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90\n"


def test_parse_report():
    got = [(f.name, f.arch, f.kernel, f.registers, f.stack, f.spill_stores, f.spill_loads) for f in ptxas_check.parse_report(REPORT)]
    assert got == [
        ("_Z5cleanPf", "sm_90", "_Z5cleanPf", 10, 0, 0, 0),
        ("_Z6spillsPKfPfi", "sm_90", "_Z6spillsPKfPfi", 32, 3864, 4860, 5316),
        ("_Z6helperPKfi", "sm_90", "_Z6spillsPKfPfi", None, 0, 8, 0),
        ("_Z5cleanPf", "sm_80", "_Z5cleanPf", 8, 0, 0, 0),
    ]


def test_gencode_archs_are_the_real_targets():
    assert ptxas_check.gencode_archs(NINJA) == {"sm_80", "sm_90"}


def _build_dir(tmp_path: Path, reports: dict[str, str]) -> Path:
    build = tmp_path / "temp.x-cuda"
    (build / "csrc" / "cuda").mkdir(parents=True)
    (build / "build.ninja").write_text(NINJA)
    for name, text in reports.items():
        (build / "csrc" / "cuda" / f"{name}.o").write_bytes(b"\0")
        (build / "csrc" / "cuda" / f"{name}.o.ptxas").write_text(text)
    return build


def test_check_passes_clean_reports(tmp_path):
    build = _build_dir(tmp_path, {"a": CLEAN})
    usages, problems = ptxas_check.check_build(build, [Path("csrc/cuda/a.cu")])
    assert problems == []
    assert {(f.arch, f.registers) for _, f in usages} == {("sm_90", 40), ("sm_80", 38)}


def test_check_reports_spills_missing_and_stale(tmp_path):
    build = _build_dir(tmp_path, {"a": CLEAN, "b": REPORT})
    (build / "csrc" / "cuda" / "c.o").write_bytes(b"\0")  # compiled, but no report
    _, problems = ptxas_check.check_build(build, [Path(f"csrc/cuda/{n}.cu") for n in "abc"])
    text = "\n".join(problems)
    assert "_Z6spillsPKfPfi spills on sm_90: 4860 bytes stored, 5316 bytes loaded" in text
    assert "_Z6helperPKfi (called from _Z6spillsPKfPfi) spills on sm_90: 8 bytes stored" in text
    assert "csrc/cuda/c.cu: no ptxas report" in text
    assert "csrc/cuda/a.cu" not in text
    assert len(problems) == 3
    # an allow-list silences the named kernel (and what it calls), nothing else
    _, problems = ptxas_check.check_build(build, [Path("csrc/cuda/b.cu")], allow="spills")
    assert problems == []


def test_spill_loads_alone_count(tmp_path):
    loads_only = CLEAN.replace("16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                               "16 bytes stack frame, 0 bytes spill stores, 12 bytes spill loads", 1)
    build = _build_dir(tmp_path, {"a": loads_only})
    _, problems = ptxas_check.check_build(build, [Path("csrc/cuda/a.cu")])
    assert problems == ["csrc/cuda/a.cu: _Z1kPfi spills on sm_90: 0 bytes stored, 12 bytes loaded"]


def test_check_detects_stale_reports(tmp_path):
    build = _build_dir(tmp_path, {"a": CLEAN.split("ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_80'")[0]})
    _, problems = ptxas_check.check_build(build, [Path("csrc/cuda/a.cu")])
    assert problems == ["csrc/cuda/a.cu: report lacks sm_80 (stale report; rebuild)"]
    obj = build / "csrc" / "cuda" / "a.o"
    t = obj.stat().st_mtime
    os.utime(obj.with_suffix(".o.ptxas"), (t - 60, t - 60))  # object rebuilt without the wrapper
    _, problems = ptxas_check.check_build(build, [Path("csrc/cuda/a.cu")])
    assert any("newer than its ptxas report" in p for p in problems)


def test_log_wrapper_keeps_the_report_beside_the_object(tmp_path):
    # A stand-in compiler that prints what nvcc --resource-usage prints (plus a warning).
    compiler = tmp_path / "fake_nvcc.py"
    compiler.write_text(
        "import sys\n"
        "assert '--resource-usage' in sys.argv\n"
        "out = sys.argv[sys.argv.index('-o') + 1]\n"
        "open(out, 'wb').write(b'obj')\n"
        f"sys.stderr.write({CLEAN!r} + 'hog.cu(3): warning: something\\n')\n"
    )
    out = tmp_path / "hog.o"
    argv = [sys.executable, str(compiler), "--", "-c", "hog.cu", "-o", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "ptxas_log.py"), *argv], capture_output=True, text=True)
    assert proc.returncode == 0
    assert (tmp_path / "hog.o.ptxas").read_text() == CLEAN
    assert proc.stderr == "hog.cu(3): warning: something\n"  # the rest passes through, the report does not


def test_log_wrapper_passes_failures_through(tmp_path):
    stale = tmp_path / "x.o.ptxas"
    stale.write_text(CLEAN)
    argv = [sys.executable, "-c", "import sys; sys.exit(3)", "--", "-c", "x.cu", "-o", str(tmp_path / "x.o")]
    assert subprocess.run([sys.executable, str(REPO / "tools" / "ptxas_log.py"), *argv]).returncode == 3
    assert not stale.exists()  # no object, no report


def test_output_path_forms():
    assert ptxas_log.output_path(["-c", "a.cu", "-o", "a.o"]) == "a.o"
    assert ptxas_log.output_path(["-c", "a.cu", "--output-file=b.o"]) == "b.o"
    assert ptxas_log.output_path(["-c", "a.cu", "-oc.o"]) == "c.o"
    assert ptxas_log.output_path(["-c", "a.cu"]) is None


@pytest.mark.skipif(not mtseg_kernels.backends()["cuda_compiled"], reason="the extension was built without its CUDA kernels")
def test_cuda_kernels_do_not_spill():
    build = ptxas_check.find_build_dir(REPO)
    if build is None:
        if os.environ.get("CI"):
            pytest.fail("CUDA extension but no build/temp.*-cuda folder: CI must build it with `make build`")
        pytest.skip("the CUDA extension was not built in this tree (no build/temp.*-cuda): nothing to read")
    sources = sorted(p.relative_to(REPO) for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    usages, problems = ptxas_check.check_build(build, sources)
    assert problems == [], "\n".join(problems)
    built = {f.arch for _, f in usages}
    assert built == ptxas_check.gencode_archs((build / "build.ninja").read_text())
