"""Trainer, methods, CLI and evaluation tests (a package, so they import their shared
helpers as ``from .helpers import ...`` from any working directory)."""
