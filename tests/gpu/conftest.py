"""The GPU tests compare with the CPU tests' oracles and fixtures, which live in tests/ops."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
