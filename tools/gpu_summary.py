#!/usr/bin/env python3
"""One table from the results folder of ``tools/gpu_check.py`` (``make gpu-check``).

    python tools/gpu_summary.py build/gpu-check

Each stage left ``<stage>.stage.json`` (command, exit status, time, whether it timed out or was
skipped) and ``<stage>.log``; test stages also a JUnit XML file, benchmark stages a
pytest-benchmark JSON file. Rows: one per stage (tests passed/failed/skipped, sanitizer
errors), then one per GPU benchmark (median time). Exit status 1 when a stage failed or
timed out, else 0. Reads files only: it runs anywhere, without torch or a GPU.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

# Stages in the order gpu_check.py runs them; unknown stage files are appended by name.
STAGE_ORDER = ["tests", "benchmarks", "memcheck", "racecheck"]

_VERBOSE_RESULT = re.compile(r"^\S+::\S.*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


@dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    complete: bool = True  # False: counted from a log cut short (timeout)

    def __str__(self) -> str:
        text = f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"
        return text if self.complete else text + " (before the stop)"


@dataclass
class Row:
    check: str
    result: str
    seconds: float | None
    details: list[str] = field(default_factory=list)


def junit_counts(path: Path) -> TestCounts:
    """Counts from a pytest JUnit XML file (``<testsuites><testsuite ...>``)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return TestCounts(tests - failed - skipped, failed, skipped)


def log_counts(text: str) -> TestCounts:
    """Counts from ``pytest -v`` lines, for a run stopped before it wrote its XML."""
    counts = TestCounts(complete=False)
    for line in text.splitlines():
        m = _VERBOSE_RESULT.match(line)
        if m is None:
            continue
        outcome = m.group(1)
        if outcome in ("PASSED", "XFAIL"):
            counts.passed += 1
        elif outcome in ("FAILED", "ERROR", "XPASS"):
            counts.failed += 1
        else:
            counts.skipped += 1
    return counts


def sanitizer_findings(text: str) -> tuple[int, str] | None:
    """Total errors reported by compute-sanitizer in a log, and how to say it; None when
    the log holds no summary (the tool never finished)."""
    races = _RACE_SUMMARY.findall(text)
    errors = [int(n) for n in _ERROR_SUMMARY.findall(text)]
    if races:
        hazards = sum(int(h) for h, _, _ in races)
        race_errors = sum(int(e) for _, e, _ in races)
        warnings = sum(int(w) for _, _, w in races)
        total = max(race_errors, sum(errors))
        return total, f"{hazards} hazards ({race_errors} errors, {warnings} warnings)"
    if errors:
        return sum(errors), f"{sum(errors)} errors"
    return None


def stage_row(stage: dict, folder: Path) -> tuple[Row, list[Row]]:
    """The row of one stage and, for a benchmark stage, one row per benchmark."""
    name = stage["name"]
    row = Row(name, "PASS", stage.get("seconds"))
    if stage.get("skipped"):
        row.result, row.seconds = "SKIP", None
        row.details.append(stage["skipped"])
        return row, []
    log_path = folder / stage["log"] if stage.get("log") else None
    log = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
    junit = folder / stage["junit"] if stage.get("junit") else None
    counts = None
    if junit is not None and junit.exists():
        counts = junit_counts(junit)
    elif junit is not None:
        counts = log_counts(log)
    if counts is not None:
        row.details.append(str(counts))
    bench_rows = []
    if stage.get("benchmark_json"):
        bench_rows = benchmark_rows(folder / stage["benchmark_json"])
        row.details.append(f"{len(bench_rows)} benchmarks")
    findings = sanitizer_findings(log) if stage.get("sanitizer") else None
    if stage.get("sanitizer"):
        row.details.append(findings[1] if findings else "no sanitizer summary in the log")
    if stage.get("timed_out"):
        row.result = "TIMEOUT"
        row.details.append(f"stopped at its {stage['timeout']:.0f} s limit")
    elif (
        stage.get("returncode") != 0
        or (counts is not None and (counts.failed or counts.passed + counts.failed == 0))
        or (findings is not None and findings[0] > 0)
        or (stage.get("sanitizer") and findings is None)
    ):
        row.result = "FAIL"
        if stage.get("returncode") not in (0, None):
            row.details.append(f"exit status {stage['returncode']}")
    if row.result != "PASS" and stage.get("log"):
        row.details.append(f"see {stage['log']}")
    return row, bench_rows


def benchmark_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        stats = bench.get("stats", {})
        median = stats.get("median")
        text = "-" if median is None else f"median {median * 1e3:.3f} ms"
        extra = bench.get("extra_info", {})
        details = [f"{stats.get('rounds', '?')} rounds"] + [f"{k}={extra[k]}" for k in ("device",) if k in extra]
        rows.append(Row(f"  {bench.get('fullname', bench.get('name', '?')).split('/')[-1]}", text, None, details))
    return rows


def summarize(folder: Path) -> tuple[str, bool]:
    """The table for a results folder, and whether every stage passed or was skipped."""
    stages = {}
    for path in sorted(folder.glob("*.stage.json")):
        record = json.loads(path.read_text())
        stages[record["name"]] = record
    order = [s for s in STAGE_ORDER if s in stages] + sorted(set(stages) - set(STAGE_ORDER))
    rows: list[Row] = []
    ok = bool(order)
    for name in order:
        row, bench = stage_row(stages[name], folder)
        ok &= row.result in ("PASS", "SKIP")
        rows.append(row)
        rows.extend(bench)
    if not rows:
        return f"gpu-check: no stage results in {folder}", False
    return render(rows), ok


def render(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    rwidth = max(len(r.result) for r in rows)
    lines = [f"{'check':<{width}}  {'result':<{rwidth}}  {'time':>6}  details", "-" * (width + rwidth + 30)]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.0f} s"
        lines.append(f"{r.check:<{width}}  {r.result:<{rwidth}}  {secs:>6}  {'; '.join(r.details)}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gpu_summary.py RESULTS_FOLDER", file=sys.stderr)
        return 2
    table, ok = summarize(Path(argv[0]))
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
