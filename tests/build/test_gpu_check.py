"""`make gpu-check`'s runner and summary, on canned results (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from build_testing import REPO, load_tool

gpu_summary = load_tool("gpu_summary")
gpu_check = load_tool("gpu_check")

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}" failures="{f}"
skipped="{s}" tests="{t}" time="12.5"></testsuite></testsuites>"""

VERBOSE_LOG = """\
============================= test session starts ==============================
tests/gpu/test_hog_cuda.py::test_forward_matches_cpu[linear-L1-uint8] PASSED [  1%]
tests/gpu/test_hog_cuda.py::test_forward_matches_cpu[linear-L1-float16] PASSED [  2%]
tests/gpu/test_hog_cuda.py::test_layouts_on_gpu FAILED                   [  3%]
tests/gpu/test_distance_cuda.py::test_cpu_only_ops_raise_on_gpu SKIPPED (r) [  4%]
tests/gpu/test_distance_cuda.py::test_opcheck_cuda ERROR                 [  5%]
"""

MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
tests/gpu/test_hog_cuda.py::test_layouts_on_gpu PASSED [ 50%]
========= Invalid __global__ read of size 4 bytes
=========     at hog_cells_kernel(...)+0x1a0
=========     by thread (31,0,0) in block (3,0,0)
=========     Address 0x7f0000000400 is out of bounds
tests/gpu/test_hog_cuda.py::test_backward PASSED [100%]
========= ERROR SUMMARY: 2 errors
"""

RACECHECK_LOG = """\
========= COMPUTE-SANITIZER
tests/gpu/test_hog_cuda.py::test_layouts_on_gpu PASSED [ 50%]
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""

BENCH = {"benchmarks": [
    {"name": "test_mtseg_cuda[hog_mtl]", "fullname": "benchmarks/bench_hog.py::test_mtseg_cuda[hog_mtl]",
     "stats": {"median": 0.00123, "rounds": 50}, "extra_info": {"device": "cuda (NVIDIA H200)"}},
    {"name": "test_mtseg_cuda_backward", "fullname": "benchmarks/bench_hog.py::test_mtseg_cuda_backward",
     "stats": {"median": 0.0045, "rounds": 20}, "extra_info": {}},
]}


def _stage(folder: Path, name: str, log: str = "", **fields) -> None:
    record = {"name": name, "command": ["x"], "timeout": 60.0, "log": f"{name}.log", "junit": None,
              "benchmark_json": None, "sanitizer": None, "skipped": None, "returncode": 0, "timed_out": False,
              "seconds": 10.0}
    record.update(fields)
    (folder / f"{name}.stage.json").write_text(json.dumps(record))
    (folder / f"{name}.log").write_text(log)


def _rows(table: str) -> dict[str, str]:
    return {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}


def test_all_passing(tmp_path):
    _stage(tmp_path, "tests", junit="tests.xml")
    (tmp_path / "tests.xml").write_text(JUNIT.format(e=0, f=0, s=2, t=40))
    _stage(tmp_path, "benchmarks", benchmark_json="benchmarks.json", seconds=80.0)
    (tmp_path / "benchmarks.json").write_text(json.dumps(BENCH))
    _stage(tmp_path, "memcheck", "========= ERROR SUMMARY: 0 errors\n", junit="memcheck.xml", sanitizer="memcheck")
    (tmp_path / "memcheck.xml").write_text(JUNIT.format(e=0, f=0, s=2, t=40))
    _stage(tmp_path, "racecheck", RACECHECK_LOG, junit="racecheck.xml", sanitizer="racecheck", skipped="compute-sanitizer not found")
    table, ok = gpu_summary.summarize(tmp_path)
    assert ok
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:]] == [
        "tests", "benchmarks", "bench_hog.py::test_mtseg_cuda[hog_mtl]", "bench_hog.py::test_mtseg_cuda_backward",
        "memcheck", "racecheck"]
    rows = _rows(table)
    assert "PASS" in rows["tests"] and "38 passed, 0 failed, 2 skipped" in rows["tests"] and "10 s" in rows["tests"]
    assert "2 benchmarks" in rows["benchmarks"] and "80 s" in rows["benchmarks"]
    forward = rows["bench_hog.py::test_mtseg_cuda[hog_mtl]"]
    assert "median 1.230 ms" in forward and "50 rounds" in forward and "NVIDIA H200" in forward
    assert "median 4.500 ms" in rows["bench_hog.py::test_mtseg_cuda_backward"]
    assert "0 errors" in rows["memcheck"] and "PASS" in rows["memcheck"]
    assert "SKIP" in rows["racecheck"] and "compute-sanitizer not found" in rows["racecheck"]


def test_failures_timeouts_and_findings(tmp_path):
    _stage(tmp_path, "tests", VERBOSE_LOG, junit="tests.xml", returncode=-15, timed_out=True, seconds=84.0)
    _stage(tmp_path, "benchmarks", benchmark_json="benchmarks.json", returncode=1)
    _stage(tmp_path, "memcheck", MEMCHECK_LOG, junit="memcheck.xml", sanitizer="memcheck", returncode=86)
    (tmp_path / "memcheck.xml").write_text(JUNIT.format(e=1, f=2, s=1, t=10))
    _stage(tmp_path, "racecheck", "========= COMPUTE-SANITIZER\n", junit="racecheck.xml", sanitizer="racecheck",
           returncode=-9)
    table, ok = gpu_summary.summarize(tmp_path)
    assert not ok
    rows = _rows(table)
    assert "TIMEOUT" in rows["tests"] and "2 passed, 2 failed, 1 skipped (before the stop)" in rows["tests"]
    assert "stopped at its 60 s limit" in rows["tests"]
    assert "FAIL" in rows["benchmarks"] and "exit status 1" in rows["benchmarks"] and "0 benchmarks" in rows["benchmarks"]
    assert "FAIL" in rows["memcheck"] and "2 errors" in rows["memcheck"] and "see memcheck.log" in rows["memcheck"]
    assert "6 passed, 3 failed, 1 skipped" in rows["memcheck"]
    # killed before it printed a summary: not a pass, and said so
    assert "FAIL" in rows["racecheck"] and "no sanitizer summary" in rows["racecheck"]


def test_race_hazards_fail(tmp_path):
    log = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    _stage(tmp_path, "racecheck", log, sanitizer="racecheck")
    table, ok = gpu_summary.summarize(tmp_path)
    assert not ok and "3 hazards (1 errors, 2 warnings)" in _rows(table)["racecheck"]
    # warnings alone (e.g. a benign read-after-read pattern) are shown but do not fail
    _stage(tmp_path, "racecheck", "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n",
           sanitizer="racecheck")
    assert gpu_summary.summarize(tmp_path)[1]


def test_no_tests_ran_is_a_failure(tmp_path):
    _stage(tmp_path, "tests", junit="tests.xml")
    (tmp_path / "tests.xml").write_text(JUNIT.format(e=0, f=0, s=0, t=0))
    assert not gpu_summary.summarize(tmp_path)[1]


def test_empty_folder(tmp_path):
    table, ok = gpu_summary.summarize(tmp_path)
    assert not ok and "no stage results" in table
    assert gpu_summary.main([str(tmp_path)]) == 1


def test_stage_runner_stops_at_its_limit(tmp_path):
    stage = gpu_check.Stage("slow", [sys.executable, "-c", "import time; print('tests/x.py::t PASSED', flush=True); time.sleep(60)"],
                            timeout=2.0, junit="slow.xml")
    record = gpu_check.run_stage(stage, tmp_path, cwd=tmp_path)
    assert record["timed_out"] and record["seconds"] < 30
    assert json.loads((tmp_path / "slow.stage.json").read_text())["timed_out"]
    row, _ = gpu_summary.stage_row(record, tmp_path)
    assert row.result == "TIMEOUT" and "1 passed, 0 failed, 0 skipped (before the stop)" in row.details


def test_stage_runner_writes_outputs_in_the_results_folder(tmp_path):
    code = "import sys; open(sys.argv[1].split('=', 1)[1], 'w').write('<testsuites/>')"
    stage = gpu_check.Stage("t", [sys.executable, "-c", code, "--junitxml=t.xml"], timeout=60.0, junit="t.xml")
    record = gpu_check.run_stage(stage, tmp_path, cwd=REPO)
    assert record["returncode"] == 0 and not record["timed_out"]
    assert (tmp_path / "t.xml").read_text() == "<testsuites/>"


def test_plan_without_compute_sanitizer():
    stages = {s.name: s for s in gpu_check.plan("python", 420.0, None, [])}
    assert list(stages) == ["tests", "benchmarks", "memcheck", "racecheck"]
    assert sum(s.timeout for s in stages.values()) == pytest.approx(420.0)
    assert stages["memcheck"].skipped and stages["racecheck"].skipped and not stages["tests"].skipped
    assert "-m" in stages["benchmarks"].command and "cuda" in stages["benchmarks"].command


def test_plan_with_compute_sanitizer():
    stages = {s.name: s for s in gpu_check.plan("python", 400.0, "/cuda/bin/compute-sanitizer", ["-k", "hog"])}
    mem = stages["memcheck"]
    assert mem.skipped is None and mem.command[:3] == ["/cuda/bin/compute-sanitizer", "--tool", "memcheck"]
    assert mem.env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # real bounds, not the cache's
    assert stages["racecheck"].command[2] == "racecheck"
    assert all(s.command[-3:-1] == ["-k", "hog"] for s in (stages["tests"], mem))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout and "nothing to check" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
