"""Typed wrappers, modules, fake kernels and autograd of the ``torch.ops.mtseg`` operators, one file per op."""
