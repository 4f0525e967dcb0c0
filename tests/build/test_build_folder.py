"""Rebuilds reuse the compiled objects: they live in a persistent folder per variant.

pip builds editable installs in a throw-away temporary folder, so before this every
`pip install -e .` (each `make test`, `make demo`) recompiled the whole extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from setuptools import Distribution

import mtseg_kernels
from build_testing import REPO, load_setup

PLATFORM_TAG = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


@pytest.mark.parametrize("variant", ["cuda", "cpu", "asan"], ids=lambda v: f"{v}-variant")
def test_editable_build_keeps_objects_in_the_tree(monkeypatch, variant):
    setup_py = load_setup()
    monkeypatch.setattr(setup_py, "VARIANT", variant)
    monkeypatch.setattr(setup_py, "SANITIZE", False)
    dist = Distribution({"name": "x", "cmdclass": {"build_ext": setup_py.BuildExtension}})
    # What setuptools' editable_wheel does: point `build` at a temporary folder.
    dist.get_command_obj("build").build_temp = "/tmp/pip-editable-build-temp"
    cmd = dist.get_command_obj("build_ext")
    cmd.ensure_finalized()
    assert Path(cmd.build_temp) == REPO / "build" / f"temp.{PLATFORM_TAG}-{variant}"


def test_explicit_build_temp_wins():
    setup_py = load_setup()
    dist = Distribution({"name": "x", "cmdclass": {"build_ext": setup_py.BuildExtension}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_temp = "/tmp/elsewhere"
    cmd.ensure_finalized()
    assert cmd.build_temp == "/tmp/elsewhere"


def test_sanitizer_build_refuses_in_place(monkeypatch):
    setup_py = load_setup()
    monkeypatch.setattr(setup_py, "SANITIZE", True)
    dist = Distribution({"name": "x", "cmdclass": {"build_ext": setup_py.BuildExtension}})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    with pytest.raises(SystemExit, match="must not build in place"):
        cmd.ensure_finalized()


def _ninja() -> str | None:
    """The ninja a build here runs: PATH's, else the one beside this interpreter (setup.py)."""
    return shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))


def test_built_extension_is_up_to_date(tmp_path):
    """The objects of the loaded build match the sources: a rebuild now compiles nothing."""
    variant = "cuda" if mtseg_kernels.backends()["cuda_compiled"] else "cpu"
    folder = REPO / "build" / f"temp.{PLATFORM_TAG}-{variant}"
    if not (folder / "build.ninja").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no {folder}: `make build` must leave its objects there")
        pytest.skip(f"the {variant} extension was not built in this tree ({folder} is absent)")
    if _ninja() is None:
        pytest.skip("ninja is not installed")
    # Dry-run on a copy of ninja's state (build.ninja names absolute paths): a ninja of
    # another version would otherwise discard the real build log and force a full rebuild.
    for name in ("build.ninja", ".ninja_log", ".ninja_deps"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, tmp_path / name)
    proc = subprocess.run([_ninja(), "-C", str(tmp_path), "-n", "-d", "explain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ninja: no work to do." in proc.stdout, (
        "sources changed since the extension was built; rebuild (`make build`). ninja says:\n"
        + proc.stdout + proc.stderr
    )
