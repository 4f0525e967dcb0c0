"""Training and evaluation harness of mtseg-kernels, imported as ``mtseg_harness``.

* ``mtseg_harness.models``: UNet, U2Net, TDSNet, CMU-Net and an anisotropic 3D UNet with
  optional multi-task heads, all returning one fixed ``ModelOutput`` (``create_model``).
* ``mtseg_harness.data``: adapters for the papers' datasets in their official layouts,
  weak labels, batched device-side augmentation (``create_dataset``, ``collate``).

The folder is ``harness/`` in the source tree; setuptools maps it to this namespaced
import name so that it cannot collide with another package called ``harness``.
"""
