"""pytest configuration shared by the benchmarks in this folder.

The benchmarks live in ``bench_*.py`` files so that ``pytest tests`` (and a bare
``pytest``, whose testpaths is ``tests``) never picks them up. This conftest is only
loaded when pytest is pointed at ``benchmarks/``; it then collects ``bench_*.py`` itself,
so all of these work:

    python -m pytest benchmarks/bench_hog.py --benchmark-only
    python -m pytest benchmarks --benchmark-only
    python -m pytest benchmarks -o python_files='bench_*.py' --benchmark-only
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch

BENCH_FILE_PATTERN = "bench_*.py"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        metavar="N",
        help="set torch.set_num_threads(N) and cv2.setNumThreads(N) before benchmarking "
        "(default: leave both libraries at their own defaults)",
    )
    parser.addoption(
        "--bench-keep-gc",
        action="store_true",
        default=False,
        help="leave Python's garbage collector on while timing (default: off, as "
        "--benchmark-disable-gc; see pytest_configure)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A full collection of this process's objects (pytest, torch, skimage, OpenCV) takes
    # ~100 ms; with the collector on, one lands inside some timed calls and adds a few ms
    # to the median of a 5 ms contestant (the HOG-MTL preset measured 10.4 ms instead of
    # 6.3). Timing without it is the same for every contestant.
    if not config.getoption("--bench-keep-gc", default=False) and hasattr(config.option, "benchmark_disable_gc"):
        config.option.benchmark_disable_gc = True
    threads = config.getoption("--bench-threads", default=None)
    if threads is not None:
        torch.set_num_threads(threads)
        try:
            import cv2
        except ImportError:
            pass
        else:
            cv2.setNumThreads(threads)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if not fnmatch.fnmatch(file_path.name, BENCH_FILE_PATTERN):
        return None
    # Leave the file to pytest's own collector when it would take it anyway (named on the
    # command line, or matched by python_files); collecting it twice duplicates every test.
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _cv2_threads() -> int | None:
    try:
        import cv2
    except ImportError:
        return None
    return cv2.getNumThreads()


@pytest.fixture
def runtime_info() -> dict[str, object]:
    """Thread counts as they are when a benchmark runs, for ``benchmark.extra_info``."""
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cv2_threads": _cv2_threads(),
    }
