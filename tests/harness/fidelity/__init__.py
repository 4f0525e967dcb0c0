"""Fidelity-table tests (a package: their basenames repeat the method test modules')."""
