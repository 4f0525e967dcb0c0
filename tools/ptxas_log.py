#!/usr/bin/env python3
"""nvcc launcher that keeps ptxas's resource report of each CUDA object.

Usage (setup.py sets it as torch's ``PYTORCH_NVCC``)::

    python tools/ptxas_log.py <compiler command ...> -- <nvcc arguments ...>

Runs the compiler command with the arguments plus ``--resource-usage`` (ptxas -v) and
writes the ptxas lines to ``<object>.ptxas``, beside the ``-o <object>`` file. Because it
runs exactly when ninja recompiles the object, the report is always that of the object
in the build folder, and an unchanged object keeps its report without a rebuild. Other
compiler output passes through unchanged; the exit status is the compiler's.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Lines ptxas prints for --resource-usage: the "ptxas info" lines and the indented
# "N bytes stack frame, N bytes spill stores, N bytes spill loads" line after them.
_REPORT_PREFIXES = ("ptxas info", "    ")


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[compiler ..., "--", args ...]`` -> (compiler command, arguments)."""
    if "--" not in argv:
        raise SystemExit("ptxas_log.py: expected '<compiler ...> -- <arguments ...>'")
    cut = argv.index("--")
    if cut == 0:
        raise SystemExit("ptxas_log.py: no compiler command before '--'")
    return argv[:cut], argv[cut + 1 :]


def output_path(args: list[str]) -> str | None:
    """The object file named by ``-o FILE`` / ``-oFILE`` / ``--output-file FILE``."""
    for i, arg in enumerate(args):
        if arg in ("-o", "--output-file") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--output-file="):
            return arg.split("=", 1)[1]
        if arg.startswith("-o") and len(arg) > 2 and not arg.startswith("-op"):
            return arg[2:]
    return None


def main(argv: list[str]) -> int:
    compiler, args = split_command(argv)
    out = output_path(args)
    if out is None or "-c" not in args:  # not a compile to an object (e.g. a device link)
        return subprocess.call(compiler + args)
    proc = subprocess.run(compiler + args + ["--resource-usage"], stderr=subprocess.PIPE, text=True)
    report, rest = [], []
    for line in proc.stderr.splitlines(keepends=True):
        (report if line.startswith(_REPORT_PREFIXES) else rest).append(line)
    sys.stderr.write("".join(rest))
    log = out + ".ptxas"
    if proc.returncode == 0:
        tmp = log + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(report))
        os.replace(tmp, log)
    elif os.path.exists(log):  # a failed compile leaves no object: no stale report either
        os.remove(log)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
