"""Atomic checkpoints: write to a temporary file in the same folder, fsync, ``os.replace``.

A crash while saving leaves the previous checkpoint intact (``os.replace`` is atomic on
POSIX and Windows when source and target are on the same file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_weights(path_or_state) -> dict:
    """The model state dict from a trainer checkpoint (or a bare state dict)."""
    state = load_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    return state["model"] if isinstance(state, dict) and "model" in state else state
