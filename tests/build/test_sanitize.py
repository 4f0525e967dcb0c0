"""`make sanitize`: a sanitizer finding must fail the run, and the tests must load the
sanitizer build of the extension, not the normal one.

A tiny C library with a planted heap overflow and a planted signed overflow is built
with the exact flags of the sanitizer build and run the way tools/sanitize.py runs the
tests (runtime preloaded, its options): each bug must kill the process with a report.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mtseg_kernels
from build_testing import load_setup, load_tool

sanitize = load_tool("sanitize")

BUGGY_C = r"""
#include <stdlib.h>
int heap_overflow(int n) {            /* writes one element past the end */
    int *a = malloc(n * sizeof(int));
    for (int i = 0; i <= n; ++i) a[i] = i;
    int s = a[0]; free(a); return s;
}
int signed_overflow(int x) { return x + 2147483647; }   /* UB for x > 0 */
int clean(int n) { int *a = malloc(n * sizeof(int)); for (int i = 0; i < n; ++i) a[i] = i; int s = a[n - 1]; free(a); return s; }
"""


@pytest.fixture(scope="module")
def buggy_library(tmp_path_factory) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    try:
        sanitize.runtime_library("libasan.so")
    except SystemExit as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("asan")
    (folder / "buggy.c").write_text(BUGGY_C)
    lib = folder / "libbuggy.so"
    flags = load_setup().SANITIZE_FLAGS
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-g", *flags, str(folder / "buggy.c"), "-o", str(lib)], check=True)
    return lib


THROWING_CPP = r"""
#include <stdexcept>
extern "C" int throw_and_catch(int x) {   // torch and triton throw C++ exceptions all the time
    try { if (x > 0) throw std::runtime_error("expected"); } catch (const std::exception&) { return x + 1; }
    return x;
}
"""


@pytest.fixture(scope="module")
def throwing_library(tmp_path_factory, buggy_library) -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("asan_cpp")
    (folder / "throws.cpp").write_text(THROWING_CPP)
    lib = folder / "libthrows.so"
    flags = load_setup().SANITIZE_FLAGS
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", *flags, str(folder / "throws.cpp"), "-o", str(lib)], check=True)
    return lib


def _call(lib: Path, function: str, arg: int, **options: str) -> subprocess.CompletedProcess:
    env = sanitize.sanitizer_env(lib, {**os.environ, **options})  # the extension path is irrelevant here
    code = f"import ctypes; print(ctypes.CDLL({str(lib)!r}).{function}({arg}))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_clean_code_runs(buggy_library):
    proc = _call(buggy_library, "clean", 8)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "7"


def test_heap_overflow_aborts_with_a_report(buggy_library):
    proc = _call(buggy_library, "heap_overflow", 8)
    assert proc.returncode == -signal.SIGABRT, proc.stderr  # abort_on_error: a signal, never exit 0
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr
    assert "sanitizer report" in sanitize.describe(proc.returncode)


def test_undefined_behaviour_aborts_with_a_report(buggy_library):
    proc = _call(buggy_library, "signed_overflow", 5)
    assert proc.returncode == -signal.SIGABRT, "UBSan must stop at its first report"
    assert "runtime error: signed integer overflow" in proc.stderr
    # The build itself makes it fatal (-fno-sanitize-recover), whatever the options say.
    proc = _call(buggy_library, "signed_overflow", 5, UBSAN_OPTIONS="halt_on_error=0:abort_on_error=1")
    assert proc.returncode == -signal.SIGABRT and "runtime error" in proc.stderr
    assert _call(buggy_library, "signed_overflow", -5).returncode == 0  # no overflow, no report


def test_cpp_exceptions_work_under_the_preloaded_runtime(throwing_library):
    # A python binary does not link libstdc++: unless it is preloaded too, ASan's
    # __cxa_throw interceptor finds no real function and aborts on the first throw.
    proc = _call(throwing_library, "throw_and_catch", 41)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"


def test_report_inside_a_pytest_run_is_shown_and_fails_it(buggy_library, tmp_path):
    """The whole tools/sanitize.py path: the report must reach the output (pytest
    captures file descriptor 2 by default, and the process dies before it could print it)."""
    ext = tmp_path / "lib" / "mtseg_kernels"
    ext.mkdir(parents=True)
    (ext / "_C.cpython-311-x86_64-linux-gnu.so").touch()  # not imported by these tests
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_bug.py").write_text(
        "import ctypes\n"
        f"LIB = ctypes.CDLL({str(buggy_library)!r})\n"
        "def test_clean():\n    assert LIB.clean(4) == 3\n"
        "def test_overflow():\n    LIB.heap_overflow(4)\n"
    )
    tool = Path(sanitize.__file__)
    run = subprocess.run([sys.executable, str(tool), "--extension-dir", str(tmp_path / "lib"), "--", str(tests)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1
    out = run.stdout + run.stderr
    assert "AddressSanitizer: heap-buffer-overflow" in out and "heap_overflow" in out
    assert "sanitize: killed by signal SIGABRT" in out
    (tests / "test_bug.py").write_text(
        "import ctypes\n"
        f"LIB = ctypes.CDLL({str(buggy_library)!r})\n"
        "def test_clean():\n    assert LIB.clean(4) == 3\n"
    )
    run = subprocess.run([sys.executable, str(tool), "--extension-dir", str(tmp_path / "lib"), "--", str(tests)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sanitize: clean" in run.stdout


def test_environment_keeps_the_callers_options(tmp_path, monkeypatch):
    monkeypatch.setenv("ASAN_OPTIONS", "verbosity=1")
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    ext = tmp_path / "_C.so"
    env = sanitize.sanitizer_env(ext)
    assert env["MTSEG_EXTENSION"] == str(ext.resolve())
    assert env["ASAN_OPTIONS"].endswith(":verbosity=1") and "halt_on_error=1" in env["ASAN_OPTIONS"]
    preload = env["LD_PRELOAD"].split()
    assert "libasan.so" in preload[0] and "libstdc++.so" in preload[1] and preload[2:] == ["/opt/other.so"]
    assert "halt_on_error=1" in env["UBSAN_OPTIONS"]


def test_describe():
    assert "signal SIGABRT" in sanitize.describe(-6)
    assert sanitize.describe(0) == "clean"
    assert "no tests" in sanitize.describe(5)


def test_extension_dir_must_hold_one_module(tmp_path):
    with pytest.raises(SystemExit, match="found 0"):
        sanitize.find_extension(tmp_path)
    (tmp_path / "mtseg_kernels").mkdir()
    (tmp_path / "mtseg_kernels" / "_C.cpython-311-x86_64-linux-gnu.so").touch()
    assert sanitize.find_extension(tmp_path).name.startswith("_C.")


def test_mtseg_extension_selects_the_module_file(tmp_path):
    """MTSEG_EXTENSION loads that file as mtseg_kernels._C (how the sanitized run gets its build)."""
    normal = Path(mtseg_kernels._C.__file__)
    copy = tmp_path / normal.name
    shutil.copy(normal, copy)
    code = "import mtseg_kernels, sys; print(mtseg_kernels._C.__file__); print(sys.modules['mtseg_kernels._C'] is mtseg_kernels._C)"
    env = {**os.environ, "MTSEG_EXTENSION": str(copy)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(copy), "True"]
    with pytest.raises(ImportError, match="MTSEG_EXTENSION"):
        mtseg_kernels._load_extension(str(tmp_path / "missing.so"))
