"""``mtseg demo``: train and compare methods on the embedded HC18 sample, on the CPU, in minutes.

The sample (``mtseg_harness/assets/hc18_sample``, 199 HC18 images at 240 x 160, CC BY 4.0,
see its ATTRIBUTION.md) is split by the HC18 adapter into 139 train / 20 validation /
40 test images. Every run trains the same small UNet (base width 8, depth 4) from the
same seed on images resized to 128 x 80 (``data.input_size``), with the same data order
and augmentation, and differs only in the method:

* ``baseline``: Dice + cross-entropy;
* ``+HOG``: HOG-MTL, Dice + CE + MSE to the HOG of the augmented image (the op's default
  504-value preset, computed in the step);
* ``+presence/sync``: TDSNet's class-presence BCE and fused sync loss on top of Dice + CE
  (its seg loss set to the baseline's here so that only the auxiliary terms differ);
* ``recursive approx. (10% strong)``: Ke et al.:
  full masks for 10% of the training images, generated weak labels for the rest,
  approximations grown every 50 steps, a final growth at evaluation.

Each run keeps its best-on-validation checkpoint; the test split is evaluated at the
sample's resolution (logits resized back to 240 x 160): Dice and IoU of the head, and
HD95 / HD in mm (pixel size from the CSV).
Everything printed is measured in this run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from ..evaluation.report import format_table, plot_curves, plot_overlays
from .assemble import build_trainer, load_config
from .evaluate import run_eval

BASE = {
    "seed": 0,
    "deterministic": False,
    "device": "cpu",
    "data": {"name": "hc18", "root": "builtin:hc18_sample", "batch_size": 8, "eval_batch_size": 20,
             "input_size": [80, 128], "cache_in_memory": True,
             "augment": {"flip_prob": 0.5, "flip_axes": [-1], "rotate": 10.0, "scale": [0.9, 1.1],
                         "brightness": 0.05}},
    "model": {"name": "unet", "options": {"base_channels": 8}},
    "optim": {"name": "adam", "lr": 2e-3},
    "sched": {"name": "multistep", "milestones": [], "gamma": 0.2},
    "train": {"steps": 250, "log_every": 10, "progress": True, "tensorboard": False, "amp": "off"},
    "eval": {"hd": True, "pad_multiple": 16},
}

RUNS = {
    "baseline": {"method": {"name": "baseline", "loss": "dice_ce"}},
    "+HOG": {"method": {"name": "hog_mtl", "alpha": 1.0, "beta": 1.0, "seg_loss": "dice_ce"}},
    "+presence/sync": {"method": {"name": "tdsnet", "seg_loss": "dice_ce"}},
    "recursive approx. (10% strong)": {"method": {"name": "recursive_approx", "strong_fraction": 0.1,
                                                  "update_every": 50, "update_batch_size": 35}},
}


def _slug(name: str) -> str:
    """Folder name of a run: ``recursive approx. (10% strong)`` -> ``recursive_approx_10_strong``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "run"


def demo_config(name: str, out: Path, steps: int) -> dict:
    run = RUNS[name]
    cfg = load_config(None, [], base={**BASE, **run})
    cfg["train"].update(steps=steps, out_dir=str(out / _slug(name)), val_every=max(steps // 5, 1),
                        checkpoint_every=steps)
    cfg["sched"]["milestones"] = [int(steps * 0.75)]
    return cfg


def run_demo(out="runs/demo", steps=None, methods=None, threads=None, quick=False) -> pd.DataFrame:
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = int(steps or (6 if quick else BASE["train"]["steps"]))
    names = list(RUNS) if not methods else [m for m in RUNS if m in methods or _slug(m) in methods]
    if not names:
        raise SystemExit(f"mtseg demo: no run matches {methods}; runs: {list(RUNS)}")
    print(f"mtseg demo: {len(names)} UNets x {steps} steps on the embedded HC18 sample "
          f"(139 train / 20 val / 40 test, CC BY 4.0), CPU, {torch.get_num_threads()} threads -> {out}")
    rows, examples, folders = [], {}, {}
    t_all = time.perf_counter()
    for name in names:
        cfg = demo_config(name, out, steps)
        t0 = time.perf_counter()
        trainer = build_trainer(cfg)
        trainer.fit()
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, summary, ex = run_eval(cfg, None, "test", Path(cfg["train"]["out_dir"]) / "eval_test", keep_examples=4,
                                  quiet=True)
        t_eval = time.perf_counter() - t0
        folders[name] = cfg["train"]["out_dir"]
        examples[name] = ex
        row = {"method": name, "dice": summary.get("dice_head"), "iou": summary.get("iou_head")}
        if "hd95_head" in summary:
            row["hd95_mm"] = summary["hd95_head"]
            row["hd_mm"] = summary["hd_head"]
            row["hd_n_inf"] = summary["hd_head_n_inf"]  # one mask empty: left out of both means
        row.update(best_val_dice=trainer.best, best_step=trainer.best_step, train_s=t_train, eval_s=t_eval)
        rows.append(row)
        print(f"  {name}: test Dice {row['dice']:.4f}" + (f", HD95 {row['hd95_mm']:.2f} mm" if "hd95_mm" in row else "")
              + f" (train {t_train:.0f} s, eval {t_eval:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    plot_curves(folders, out / "curves.png")
    plot_overlays(examples, out / "overlays.png")
    total = time.perf_counter() - t_all
    shown = table[[c for c in ("method", "dice", "iou", "hd95_mm", "hd_mm", "hd_n_inf", "best_val_dice", "train_s")
                   if c in table]]
    text = format_table(shown)
    notes = [f"test split: 40 images at 240x160, mean over images; {steps} steps x batch 8 per run; total {total:.0f} s"]
    if "hd95_mm" in table:
        notes.append("hd95_mm, hd_mm: means over the test images where prediction and ground truth both hold "
                     "the head; hd_n_inf: images where only one does (infinite distance, left out of both means)")
    if "hd95_mm" not in table:
        notes.append("HD95/HD not computed: mtseg_kernels.surface_metrics is not in this build")
    report = "# mtseg demo (embedded HC18 sample)\n\n" + text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    for name, folder in folders.items():
        rounds = Path(folder) / "rounds.csv"
        if rounds.is_file():
            r = pd.read_csv(rounds)
            r.to_csv(out / "approximation_rounds.csv", index=False)
            report += (f"\n## {name}: approximations of the weak images vs their true masks, per round\n\n"
                       + format_table(r) + "\n")
            print(f"{name}: Dice of the approximations vs the true masks by round: "
                  + ", ".join(f"{d:.3f}" for d in r["dice_vs_true"]))
    (out / "report.md").write_text(report)
    (out / "demo.yaml").write_text(yaml.safe_dump({"steps": steps, "runs": names, "total_s": total}))
    print()
    print(text)
    for n in notes:
        print(n)
    print(f"report: {out / 'report.md'}, curves.png, overlays.png, comparison.csv, per-run folders")
    return table
