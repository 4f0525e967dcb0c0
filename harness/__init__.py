"""Training and evaluation harness of mtseg-kernels, imported as ``mtseg_harness``.

Models, datasets, methods and the CLI arrive with their own issues; this package
exists now so the install layout (``harness/`` -> ``mtseg_harness``) is fixed early.
"""
