"""Shared helpers of the trainer/methods/CLI tests: the embedded sample, a tiny model, tiny configs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "harness" / "assets" / "hc18_sample"

# A UNet small enough that a step on 8 images of 32 x 48 takes milliseconds.
TINY_MODEL = {"name": "unet", "options": {"base_channels": 4, "depth": 2}}


def tiny_config(out_dir, **sections):
    """A resolved config on the embedded HC18 sample, resized to 32 x 48, tiny UNet, no progress bar."""
    from mtseg_harness.config import deep_merge
    from mtseg_harness.runs import load_config

    base = {
        "seed": 0,
        "deterministic": True,
        "device": "cpu",
        "data": {"name": "hc18", "root": str(SAMPLE), "batch_size": 4, "eval_batch_size": 20, "input_size": [32, 48],
                 "augment": {"flip_prob": 0.5, "rotate": 10.0, "scale": [0.9, 1.1]}},
        "model": TINY_MODEL,
        "method": {"name": "baseline"},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"steps": 4, "val_every": 0, "log_every": 1, "checkpoint_every": 0, "progress": False,
                  "out_dir": str(out_dir), "tensorboard": False},
        "eval": {"hd": False, "pad_multiple": 4},
    }
    return load_config(None, [], base=deep_merge(base, sections))
