"""Helpers for the build tests: load a tool script or setup.py as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_module(path: Path, name: str) -> ModuleType:
    """Import a script by path (tools/ is not a package; setup.py only runs setup() as __main__)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_tool(stem: str) -> ModuleType:
    return load_module(REPO / "tools" / f"{stem}.py", f"mtseg_tools_{stem}")


def load_setup() -> ModuleType:
    return load_module(REPO / "setup.py", "mtseg_setup")
