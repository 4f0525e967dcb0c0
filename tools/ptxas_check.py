#!/usr/bin/env python3
"""Check the CUDA kernels' ptxas reports for register spills.

The build keeps ptxas's report of every CUDA object beside it (``<object>.ptxas``, see
``tools/ptxas_log.py``), so this check reads the normal build folder and never compiles
anything. It fails when a kernel (or a device function it calls) spills registers to
local memory on any architecture of the build, when a ``csrc/cuda/*.cu`` source has no
report, or when a report lacks an architecture the build compiles for (a stale report)::

    python tools/ptxas_check.py                 # newest build/temp.*-cuda folder
    python tools/ptxas_check.py --build-dir DIR --allow 'regex of kernels allowed to spill'

Exit status: 0 clean (or no CUDA build folder: nothing to check), 1 problems found.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")
_GENCODE = re.compile(r"-gencode[= ]arch=compute_\w+,code=(sm_\w+)")


@dataclass
class FunctionUsage:
    """One function's ptxas resources on one architecture."""

    name: str
    arch: str
    kernel: str  # the entry function being compiled when this was reported
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    registers: int | None = None  # reported for entry functions only

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def parse_report(text: str) -> list[FunctionUsage]:
    """Functions of a ptxas ``-v`` report, in order.

    ptxas prints, per entry function and architecture, a "Compiling entry function"
    line, then "Function properties for F" + a stack/spill line for the entry and for
    each non-inlined device function it calls, then the entry's register count.
    """
    out: list[FunctionUsage] = []
    kernel = arch = None
    pending: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernel, arch = m.group(1), m.group(2)
            pending = None
        elif (m := _PROPS.search(line)) and kernel is not None:
            pending = m.group(1)
        elif (m := _FRAME.search(line)) and pending is not None:
            out.append(FunctionUsage(pending, arch, kernel, *map(int, m.groups())))
            pending = None
        elif (m := _REGS.search(line)) and kernel is not None:
            entry = next((f for f in reversed(out) if f.name == kernel and f.arch == arch), None)
            if entry is None:  # no properties line seen for it: keep the count anyway
                entry = FunctionUsage(kernel, arch, kernel)
                out.append(entry)
            entry.registers = int(m.group(1))
    return out


def gencode_archs(build_ninja: str) -> set[str]:
    """The real architectures (``sm_XY``) a torch-generated ``build.ninja`` compiles for."""
    return set(_GENCODE.findall(build_ninja))


def find_build_dir(root: Path = ROOT) -> Path | None:
    """The most recently built ``build/temp.*-cuda`` folder, if any."""
    dirs = [d for d in (root / "build").glob("temp.*-cuda") if (d / "build.ninja").is_file()]
    return max(dirs, key=lambda d: (d / "build.ninja").stat().st_mtime, default=None)


def check_build(build_dir: Path, sources: list[Path], allow: str | None = None):
    """Reports of ``build_dir`` for the given ``.cu`` sources (paths relative to the repo,
    as the build names the objects: ``csrc/cuda/hog.cu`` -> ``<build_dir>/csrc/cuda/hog.o``).

    Returns ``(usages, problems)``: every function's usage (with the source's name) and
    a list of human-readable problems (empty when clean).
    """
    problems: list[str] = []
    usages: list[tuple[str, FunctionUsage]] = []
    ninja = build_dir / "build.ninja"
    archs = gencode_archs(ninja.read_text()) if ninja.is_file() else set()
    if not archs:
        problems.append(f"{ninja}: no -gencode architectures found (not a CUDA build folder?)")
    allowed = re.compile(allow) if allow else None
    for src in sources:
        rel = str(src)
        report = build_dir / (str(Path(src).with_suffix(".o")) + ".ptxas")  # beside the object
        if not report.is_file():
            problems.append(f"{rel}: no ptxas report {report} (rebuild; it was compiled without tools/ptxas_log.py?)")
            continue
        obj = report.with_suffix("")
        if obj.is_file() and obj.stat().st_mtime > report.stat().st_mtime + 1:
            problems.append(f"{rel}: {obj} is newer than its ptxas report (compiled without tools/ptxas_log.py; rebuild)")
        funcs = parse_report(report.read_text())
        seen = {f.arch for f in funcs}
        if funcs and archs - seen:
            problems.append(f"{rel}: report lacks {' '.join(sorted(archs - seen))} (stale report; rebuild)")
        for f in funcs:
            usages.append((rel, f))
            if f.spills and not (allowed and (allowed.search(f.name) or allowed.search(f.kernel))):
                where = f.name if f.name == f.kernel else f"{f.name} (called from {f.kernel})"
                problems.append(
                    f"{rel}: {where} spills on {f.arch}: {f.spill_stores} bytes stored, {f.spill_loads} bytes loaded"
                )
    return usages, problems


def demangle(names: list[str]) -> dict[str, str]:
    """C++ names via c++filt when it is there (else the mangled names)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def table(usages: list[tuple[str, FunctionUsage]], width: int = 70) -> str:
    """Per source and kernel: register range over the architectures, most stack, spills."""
    rows: dict[tuple[str, str], list[FunctionUsage]] = {}
    for src, f in usages:
        rows.setdefault((src, f.name), []).append(f)
    names = demangle(sorted({n for _, n in rows}))
    sw = max([len("source")] + [len(src) for src, _ in rows])
    lines = [f"{'source':<{sw}} {'function':<{width}} {'regs':>7} {'stack':>5} {'spill':>5} archs"]
    for (src, name), fs in sorted(rows.items()):
        regs = [f.registers for f in fs if f.registers is not None]
        reg = "-" if not regs else f"{min(regs)}" if min(regs) == max(regs) else f"{min(regs)}-{max(regs)}"
        label = names[name] if len(names[name]) <= width else names[name][: width - 3] + "..."
        lines.append(
            f"{src:<{sw}} {label:<{width}} {reg:>7} {max(f.stack for f in fs):>5} {max(f.spills for f in fs):>5} "
            + ",".join(sorted({f.arch.removeprefix('sm_') for f in fs}, key=lambda a: (len(a), a)))
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, help="build folder (default: newest build/temp.*-cuda)")
    parser.add_argument("--allow", help="regex of (mangled) function names allowed to spill")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    build_dir = args.build_dir or find_build_dir()
    if build_dir is None:
        print("ptxas-check: no CUDA build folder (build/temp.*-cuda): the extension was built without CUDA; nothing to check")
        return 0
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    usages, problems = check_build(build_dir, [s.relative_to(ROOT) for s in sources], args.allow)
    if not args.quiet:
        print(table(usages))
    for p in problems:
        print("ptxas-check: " + p, file=sys.stderr)
    kernels = {(f.kernel, f.arch) for _, f in usages}
    print(f"ptxas-check: {len(sources)} sources, {len(kernels)} kernel builds in {build_dir}: "
          + (f"{len(problems)} problem(s)" if problems else "no spills"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
