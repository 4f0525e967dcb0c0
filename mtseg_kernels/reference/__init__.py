"""Slow, obviously correct implementations of every op: the oracle the kernels are tested against."""
