"""The harness tests import their shared helpers by package-relative imports, not through
whichever ``conftest`` module pytest loaded last: collection works from any working directory
and in any order of arguments."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_test_imports_a_conftest_module():
    phrases = ("from conftest import", "import conftest")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py")
                 if p != Path(__file__).resolve() and any(s in p.read_text() for s in phrases)]
    assert not offenders


@pytest.mark.parametrize("cwd,args", [
    # data's conftest is the last one loaded: `from conftest import REPO` in the training tests failed here
    (".", ["tests/harness/training/test_cli.py", "tests/harness/data/test_data_hc18.py"]),
    ("tests/harness/training", ["test_cli.py", "../data/test_data_hc18.py"]),
], ids=["repo-root", "training-folder"])
def test_the_training_tests_collect_from_any_cwd(cwd, args):
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO / cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.splitlines()[-1]
