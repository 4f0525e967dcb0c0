#!/usr/bin/env python3
"""Run pytest against the AddressSanitizer + UBSan build of the extension.

``make sanitize`` builds that extension into its own folder (``MTSEG_SANITIZE=1
setup.py build_ext --build-lib DIR``), then runs::

    python tools/sanitize.py --extension-dir build/sanitize/lib -- tests/ops [tests/fuzz] [pytest args]

The interpreter is not instrumented, so the ASan runtime is preloaded (``LD_PRELOAD``,
with libstdc++)
and the tests import the instrumented ``_C`` through ``MTSEG_EXTENSION``. Any report
aborts the process (``halt_on_error``; the build uses ``-fno-sanitize-recover``), which
fails the run: a sanitizer finding is never a warning.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

# detect_leaks: CPython and torch keep allocations until exit by design, so leak reports
# would be noise. allocator_may_return_null: a too-large allocation must reach torch as a
# failed malloc (a clean error the tests may expect), not as an ASan abort.
ASAN_OPTIONS = "halt_on_error=1:abort_on_error=1:detect_leaks=0:allocator_may_return_null=1:detect_odr_violation=0"
UBSAN_OPTIONS = "halt_on_error=1:abort_on_error=1:print_stacktrace=1"


def runtime_library(name: str, compiler: str | None = None) -> str:
    """Full path of a sanitizer runtime (``libasan.so``) of the compiler torch builds with."""
    compiler = compiler or os.environ.get("CXX") or "c++"
    out = subprocess.run(shlex.split(compiler) + [f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    if out.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"sanitize: {compiler} does not know where {name} is (got {path!r}); install its ASan runtime")
    return os.path.realpath(path)


def find_extension(extension_dir: Path) -> Path:
    found = sorted(extension_dir.glob("mtseg_kernels/_C*.so"))
    if len(found) != 1:
        raise SystemExit(f"sanitize: expected one mtseg_kernels/_C*.so under {extension_dir}, found {len(found)}")
    return found[0]


def sanitizer_env(extension: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the sanitized run; options already set by the caller come last
    (they win: ASan and UBSan read the last value of a repeated option)."""
    env = dict(os.environ if base is None else base)
    env["MTSEG_EXTENSION"] = str(extension.resolve())
    # libstdc++ too: python does not link it, so without it ASan resolves no real
    # __cxa_throw and aborts at the first C++ exception (triton's import throws one).
    preload = [runtime_library("libasan.so"), runtime_library("libstdc++.so.6"), env.get("LD_PRELOAD")]
    env["LD_PRELOAD"] = " ".join(filter(None, preload))
    env["ASAN_OPTIONS"] = ":".join(filter(None, [ASAN_OPTIONS, env.get("ASAN_OPTIONS")]))
    env["UBSAN_OPTIONS"] = ":".join(filter(None, [UBSAN_OPTIONS, env.get("UBSAN_OPTIONS")]))
    return env


def describe(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        return f"killed by signal {name}: a sanitizer report (see above) or a crash"
    return {0: "clean", 5: "pytest collected no tests"}.get(returncode, f"pytest exit status {returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run pytest against the sanitizer build of mtseg_kernels._C")
    parser.add_argument("--extension-dir", type=Path, required=True, help="the --build-lib folder of the sanitizer build")
    parser.add_argument("pytest_args", nargs="+", help="test folders and pytest options (after --)")
    args = parser.parse_args(argv)
    extension = find_extension(args.extension_dir)
    env = sanitizer_env(extension)
    # --capture=sys: a report is written to file descriptor 2 just before the abort;
    # pytest's default fd capture would swallow it with the dying process.
    # -p no:cacheprovider: the sanitized run must not rewrite the normal run's last-failed list.
    cmd = [sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider", *args.pytest_args]
    print(f"sanitize: {' '.join(cmd[2:])}\n  with {extension}\n  LD_PRELOAD={env['LD_PRELOAD']}", flush=True)
    rc = subprocess.call(cmd, env=env)
    print(f"sanitize: {describe(rc)}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
