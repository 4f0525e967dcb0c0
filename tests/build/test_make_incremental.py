"""`make build` runs the extension build only when something it is built from changed.

The real Makefile runs in a scratch project whose "python" is a script that logs its
calls, so these tests take a second and compile nothing. (That a rebuild then reuses
the compiled objects is test_build_folder.py's job.)
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from build_testing import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"pip install"*"-e ."*) mkdir -p mtseg_kernels && : > mtseg_kernels/_C.fake.so
                         echo "mtseg-kernels: building backends [cpu] (fake)" ;;
esac
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "tools").mkdir()
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    for name in ("setup.py", "pyproject.toml", "requirements-ci.txt", "csrc/cpu/op.cpp", "csrc/op.h", "tools/ptxas_log.py"):
        (root / name).write_text(f"# {name}\n")
    python = root / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    deps = root / ".venv" / ".deps-stamp"
    deps.touch()
    _age(root, seconds=100)  # every input older than anything make will write
    return root


def _age(root: Path, seconds: float) -> None:
    past = root.stat().st_mtime - seconds
    for path in root.rglob("*"):
        os.utime(path, (past, past), follow_symlinks=False)


def _bump(path: Path, root: Path) -> None:
    """Make `path` newer than every file make wrote, yet in the past (mtimes can be coarse)."""
    _age(root, seconds=100)
    os.utime(path, (root.stat().st_mtime - 50,) * 2)


def make_build(root: Path, **env: str) -> list[str]:
    """Run `make build`; return the python calls it made that built the extension."""
    log = root / "calls.log"
    log.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k not in ("MTSEG_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "MAKEFLAGS")}
    full_env.update(env, FAKE_LOG=str(log))
    proc = subprocess.run(["make", "-C", str(root), "build"], env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return [c for c in calls if "pip install" in c and "-e ." in c]


def test_second_build_does_nothing(project: Path):
    assert len(make_build(project)) == 1
    assert make_build(project) == []  # e.g. `make test` then `make demo`
    assert make_build(project) == []


@pytest.mark.parametrize("changed", ["csrc/cpu/op.cpp", "csrc/op.h", "setup.py", "pyproject.toml", "tools/ptxas_log.py"])
def test_changed_input_rebuilds(project: Path, changed: str):
    make_build(project)
    _bump(project / changed, project)
    assert len(make_build(project)) == 1
    assert make_build(project) == []


def test_new_source_file_rebuilds(project: Path):
    make_build(project)
    (project / "csrc" / "cuda").mkdir()
    (project / "csrc" / "cuda" / "new.cu").write_text("// new\n")
    _bump(project / "csrc" / "cuda" / "new.cu", project)
    assert len(make_build(project)) == 1


def test_new_requirements_rebuild(project: Path):
    make_build(project)  # a new torch pin reinstalls the requirements, then rebuilds
    _bump(project / ".venv" / ".deps-stamp", project)
    assert len(make_build(project)) == 1


def test_build_settings_rebuild_once(project: Path):
    make_build(project)
    assert len(make_build(project, TORCH_CUDA_ARCH_LIST="9.0")) == 1
    assert make_build(project, TORCH_CUDA_ARCH_LIST="9.0") == []
    assert len(make_build(project, TORCH_CUDA_ARCH_LIST="9.0", MTSEG_BUILD_CUDA="0")) == 1
    assert len(make_build(project)) == 1  # back to the defaults


def test_missing_module_rebuilds(project: Path):
    make_build(project)
    (project / "mtseg_kernels" / "_C.fake.so").unlink()
    assert len(make_build(project)) == 1
    assert make_build(project) == []


def test_gpu_check_without_a_gpu_says_so_and_builds_nothing(project: Path, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # what nvidia-smi does on a machine without a GPU
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n")
    smi.chmod(0o755)
    log = project / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    proc = subprocess.run(["make", "-C", str(project), "gpu-check"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no NVIDIA GPU here" in proc.stdout and "nothing to check" in proc.stdout
    assert not log.exists()  # neither a build nor the check ran
