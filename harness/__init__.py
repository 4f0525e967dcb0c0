"""Training and evaluation harness of mtseg-kernels, imported as ``mtseg_harness``.

* ``mtseg_harness.models``: UNet, U2Net, TDSNet, CMU-Net and an anisotropic 3D UNet with
  optional multi-task heads, all returning one fixed ``ModelOutput`` (``create_model``).
* ``mtseg_harness.data``: adapters for the papers' datasets in their official layouts,
  weak labels, batched device-side augmentation (``create_dataset``, ``collate``).
* ``mtseg_harness.methods``: baseline, HOG-MTL, TDSNet, CMU-Net and recursive
  approximation, each a loss and its labels on one shared trainer.
* ``mtseg_harness.training`` / ``mtseg_harness.evaluation``: the trainer (AMP,
  schedules, atomic resumable checkpoints, DDP), metrics and reports.
* ``mtseg_harness.runs``: a config turned into a run (``load_config``, ``build_run``,
  ``build_trainer``, ``run_eval``) and the commands built on it.
* ``mtseg_harness.cli``: the ``mtseg`` command (train, eval, labels, bench, demo) over
  the YAML configs in ``configs/``.

Layers import one way: cli -> runs -> training -> {methods, models, data, evaluation};
``docs/architecture.md`` in the repository describes them.

The folder is ``harness/`` in the source tree; setuptools maps it to this namespaced
import name so that it cannot collide with another package called ``harness``.
"""
