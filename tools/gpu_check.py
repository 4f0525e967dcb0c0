#!/usr/bin/env python3
"""``make gpu-check``: everything a GPU run should prove, in one bounded command.

Stages, each with its own time limit (together ``--budget`` seconds, default 420, so the
whole command stays under 8 minutes on one H100/H200-class GPU once the extension is
built):

* ``tests``      ``pytest tests/gpu``
* ``benchmarks`` the GPU benchmarks (``benchmarks/``, those marked ``cuda``)
* ``memcheck``   ``compute-sanitizer --tool memcheck`` over ``pytest tests/gpu``
                 (torch's caching allocator off, so out-of-bounds accesses hit real bounds)
* ``racecheck``  ``compute-sanitizer --tool racecheck`` over the same tests

A stage that runs out of time is stopped and reported as TIMEOUT with what it had
counted; the others still run. Results go to ``--out`` (one ``<stage>.stage.json`` and
``<stage>.log`` each, JUnit XML, benchmark JSON), then ``tools/gpu_summary.py`` prints one
table. Exit status: 0 when every stage passed (or was skipped, e.g. no compute-sanitizer,
which the table says), 1 otherwise. Without a CUDA device it says so and exits 0 at once.

Without the project's venv (a GPU machine with its own torch): build the extension with
``pip install --no-build-isolation -e .``, then ``python tools/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_summary  # noqa: E402

# Share of the budget per stage: the sanitizers slow the tests down the most.
SHARES = {"tests": 0.2, "benchmarks": 0.25, "memcheck": 0.35, "racecheck": 0.2}
SANITIZER_EXIT = 86  # compute-sanitizer's exit status when it found errors


@dataclass
class Stage:
    name: str
    command: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    junit: str | None = None
    benchmark_json: str | None = None
    sanitizer: str | None = None
    skipped: str | None = None  # why it cannot run here


def find_compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for candidate in (Path(cuda) / "bin" / "compute-sanitizer", Path(cuda) / "compute-sanitizer" / "compute-sanitizer"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def plan(python: str, budget: float, sanitizer: str | None, test_args: list[str]) -> list[Stage]:
    pytest = [python, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    tests = ["tests/gpu", *test_args]
    stages = [
        Stage("tests", [*pytest, *tests, "--junitxml=tests.xml"], budget * SHARES["tests"], junit="tests.xml"),
        Stage(
            "benchmarks",
            [*pytest, "benchmarks", "-o", "python_files=bench_*.py", "-m", "cuda", "--benchmark-only",
             "--benchmark-max-time=0.5", "--benchmark-json=benchmarks.json"],
            budget * SHARES["benchmarks"],
            benchmark_json="benchmarks.json",
        ),
    ]
    for tool in ("memcheck", "racecheck"):
        command = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", str(SANITIZER_EXIT),
                   "--print-limit", "100", *pytest, *tests, f"--junitxml={tool}.xml"]
        stages.append(Stage(
            tool, command, budget * SHARES[tool],
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {},
            junit=f"{tool}.xml", sanitizer=tool,
            skipped=None if sanitizer else "compute-sanitizer not found (PATH, $CUDA_HOME/bin)",
        ))
    return stages


def run_stage(stage: Stage, out: Path, cwd: Path = ROOT) -> dict:
    """Run one stage with its time limit; write and return its record (``<name>.stage.json``)."""
    record = {"name": stage.name, "command": stage.command, "timeout": stage.timeout, "log": f"{stage.name}.log",
              "junit": stage.junit, "benchmark_json": stage.benchmark_json, "sanitizer": stage.sanitizer,
              "skipped": stage.skipped, "returncode": None, "timed_out": False, "seconds": 0.0}
    for name in (stage.junit, stage.benchmark_json):
        if name:
            (out / name).unlink(missing_ok=True)
    if stage.skipped is None:
        # Output files are named relative to the results folder: absolute in the command.
        command = [_absolute(a, out) for a in stage.command]
        start = time.monotonic()
        with open(out / record["log"], "w") as log:
            proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            try:
                record["returncode"] = proc.wait(timeout=stage.timeout)
            except subprocess.TimeoutExpired:
                record["timed_out"] = True
                _stop(proc)
                record["returncode"] = proc.returncode
        record["seconds"] = round(time.monotonic() - start, 1)
    (out / f"{stage.name}.stage.json").write_text(json.dumps(record, indent=1))
    return record


def _absolute(arg: str, out: Path) -> str:
    for flag in ("--junitxml=", "--benchmark-json="):
        if arg.startswith(flag):
            return flag + str(out / arg[len(flag):])
    return arg


def _stop(proc: subprocess.Popen) -> None:
    """Stop the stage's whole process group: SIGTERM, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def device_report() -> tuple[bool, str]:
    """(usable, one line): is there a CUDA device and an extension with CUDA kernels?"""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device here (torch.cuda.is_available() is False)"
    import mtseg_kernels

    name = torch.cuda.get_device_name()
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    line = f"{name} (sm {cap}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    if not mtseg_kernels.backends()["cuda_compiled"]:
        return False, line + ": but the extension was built without its CUDA kernels (rebuild with MTSEG_BUILD_CUDA=1)"
    return True, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tests, benchmarks and compute-sanitizer on the GPU; one summary table")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check", help="results folder")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all stages together (default 420)")
    parser.add_argument("--stages", default=",".join(SHARES), help=f"comma-separated subset of {','.join(SHARES)}")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the test stages (after --)")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(wanted) - set(SHARES):
        parser.error(f"unknown stages {sorted(unknown)}; choose from {list(SHARES)}")

    usable, line = device_report()
    if not usable and line.startswith("no CUDA device"):
        print(f"gpu-check: {line}: nothing to check. Run it on a machine with a CUDA GPU.")
        return 0
    if not usable:
        print(f"gpu-check: {line}", file=sys.stderr)
        return 1
    print(f"gpu-check: {line}; budget {args.budget:.0f} s; results in {args.out}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.stage.json"):
        old.unlink()
    (args.out / "device.txt").write_text(line + "\n")
    for stage in plan(sys.executable, args.budget, find_compute_sanitizer(), args.pytest_args):
        if stage.name not in wanted:
            continue
        print(f"gpu-check: {stage.name} (limit {stage.timeout:.0f} s) ...", flush=True)
        record = run_stage(stage, args.out)
        state = "skipped" if record["skipped"] else "timed out" if record["timed_out"] else f"exit {record['returncode']}"
        print(f"gpu-check: {stage.name}: {state} after {record['seconds']:.0f} s", flush=True)
    table, ok = gpu_summary.summarize(args.out)
    print()
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
