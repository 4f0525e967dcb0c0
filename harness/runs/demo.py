"""``mtseg demo``: train and compare methods on the embedded HC18 sample, on the CPU, in minutes.

The sample (``mtseg_harness/assets/hc18_sample``, 199 HC18 images at 240 x 160, CC BY 4.0,
see its ATTRIBUTION.md) is split by image into 139 train / 20 validation / 40 test
images, and every image is cut into six 80 x 80 tiles (``hc18_tiles``). On whole images
the head is always present, so a presence task would have a constant target; on tiles
it is absent from about a quarter of them. Every run trains the same small UNet (base
width 8) with the same data order and augmentation, and differs only in the method;
the settings are in ``configs/_base/demo.yaml`` and one ``configs/demo_<run>.yaml`` per
run (:data:`RUNS`). What each auxiliary task sees (:data:`SEES`):

* ``baseline``: Dice + CE on the tile's mask;
* ``+HOG``: also the HOG of the augmented tile (504 values), regressed from the bottleneck;
* ``+presence/sync``: also whether the tile holds the head (BCE of a presence head) and
  the sync loss tying that head to the segmentation;
* ``recursive approx. (10% strong)``: full masks for 10% of the training tiles, weak
  regions inside the head for the rest, grown into approximations every 50 steps.

Each method is trained with seeds ``0..N-1`` (``--seeds``), keeps its best-on-validation
checkpoint and is evaluated on the test tiles: each test image's prediction is stitched
from its tiles, and Dice, IoU and HD95 (mm) of the head are measured per image; a
head-free tile with any pixel predicted as head counts as a false head. Per method:
mean +- sd over seeds of the mean over images, and the paired per-image Dice difference
to the baseline of the same seed with a 95% bootstrap interval over seeds and images
(:func:`paired_difference`); a difference whose interval contains 0 is printed as
within noise. No timing is shown per method: on a shared machine it measures the load.
Everything printed is measured in this run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ..data import stitch
from ..evaluation import metrics as M
from ..evaluation.evaluate import predict_batch, split_segmentation
from ..evaluation.report import format_table, plot_curves, plot_overlays
from ..training import load_checkpoint
from ..training.checkpoint import load_model_state
from ..training.data import eval_loader
from .assemble import build_run, build_trainer, load_config

#: run name -> its config file in the configs folder
RUNS = {
    "baseline": "demo_baseline.yaml",
    "+HOG": "demo_hog.yaml",
    "+presence/sync": "demo_presence_sync.yaml",
    "recursive approx. (10% strong)": "demo_recursive_approx.yaml",
}

#: what the run's auxiliary task is trained on (printed in the report)
SEES = {
    "baseline": "no auxiliary task: Dice + CE on the tile's mask",
    "+HOG": "the HOG (504 values) of each augmented tile, regressed from the bottleneck",
    "+presence/sync": "whether each tile holds the head (1 for about 3 in 4 training tiles) and the sync loss "
                      "between that presence head and the segmentation",
    "recursive approx. (10% strong)": "full masks of 10% of the training tiles only; for the rest, weak regions "
                                      "inside the head grown into approximations every 50 steps",
}

#: columns of the printed table (and of the README's demo table)
TABLE_COLUMNS = ("method", "Dice", "IoU", "HD95 (mm)", "false head", "ΔDice vs baseline [95% CI]", "verdict")
DEFAULT_SEEDS = 3
BOOTSTRAP = 2000


def _slug(name: str) -> str:
    """Folder name of a run: ``recursive approx. (10% strong)`` -> ``recursive_approx_10_strong``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "run"


def config_dir() -> Path:
    """The ``configs`` folder of the source tree (next to the package), else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if (here / RUNS["baseline"]).is_file() else Path("configs")


def demo_config(name: str, out: Path, seed: int, steps: int | None = None, configs=None) -> dict:
    """The resolved config of run ``name`` with ``seed``, writing to ``out/<run>/seed<seed>``.

    ``steps``: another step budget; the learning-rate milestone (at 3/4), validation
    (5 times) and the last checkpoint follow it.
    """
    path = Path(configs or config_dir()) / RUNS[name]
    if not path.is_file():
        raise SystemExit(f"mtseg demo: {path} not found; the demo reads configs/demo_*.yaml from the source tree "
                         f"(run it from the repository root or give --configs DIR)")
    sets = [f"seed={int(seed)}", f"train.out_dir={out / _slug(name) / f'seed{int(seed)}'}"]
    if steps is not None:
        sets += [f"train.steps={steps}", f"sched.milestones=[{int(steps * 0.75)}]",
                 f"train.val_every={max(steps // 5, 1)}", f"train.checkpoint_every={steps}"]
    return load_config(path, sets)


@torch.no_grad()
def evaluate_tiles(cfg: dict, split_key: str = "test", keep_examples: int = 0):
    """A trained demo run on the tiles of ``split_key``: per-image and per-tile tables.

    The best checkpoint (else the last) of ``cfg``'s run predicts every tile; the tiles of
    each image are stitched (:func:`~mtseg_harness.data.stitch`) and the head is measured
    on the whole image. Returns ``(images, tiles, examples)``: ``images`` one row per image
    (``image_id``, ``dice``, ``iou``, ``hd95_mm``, ``hd_mm``: ``inf`` where one of the two
    masks is empty), ``tiles`` one row per tile (``head``: the tile holds the head;
    ``pred_pixels``: pixels predicted as head; ``presence_prob``: the presence head's
    probability where the model has one), ``examples``: ``(image, mask, prediction)`` of
    the first ``keep_examples`` images.
    """
    run_dir = Path(cfg["train"]["out_dir"])
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    state = load_checkpoint(ckpt, required=("model", "config"))
    run = build_run(cfg, split_key)
    load_model_state(run.model, state["model"], ckpt)
    run.method.load_state_dict(state.get("method") or {})
    model = run.model.eval()
    has_presence = run.method.heads().presence is not None
    parts: dict[str, list] = {}
    tile_rows = []
    for batch in eval_loader(run.dataset, cfg):
        x = batch["image"].float()
        # labels only: the recursive method also returns its grown instances, which the
        # demo's per-image Dice / HD95 do not use
        pred, _ = split_segmentation(predict_batch(model, run.method.segment, x, batch, int(cfg["eval"]["pad_multiple"])))
        prob = torch.sigmoid(model(x).presence[:, 1].float()) if has_presence else None
        for i, image_id in enumerate(batch["image_id"]):
            parts.setdefault(image_id, []).append((batch["tile_origin"][i].tolist(), batch["image"][i], batch["mask"][i],
                                                   pred[i], batch["spacing"][i]))
            tile_rows.append({"image_id": image_id, "case_id": batch["case_id"][i], "head": bool((batch["mask"][i] == 1).any()),
                              "pred_pixels": int((pred[i] == 1).sum()),
                              "presence_prob": float(prob[i]) if prob is not None else float("nan")})
    size = run.dataset.image_size
    image_rows, examples = [], []
    for image_id, tiles in parts.items():
        origins = [t[0] for t in tiles]
        image, mask, pred = (stitch([t[k] for t in tiles], origins, size) for k in (1, 2, 3))
        dice, iou = M.dice_iou(pred[None], mask[None], 2, run.dataset.ignore_index)
        surf = M.surface_distances(pred[None], mask[None], 2, tiles[0][4][None], run.dataset.ignore_index, classes=[1])
        image_rows.append({"image_id": image_id, "dice": float(dice[0, 1]), "iou": float(iou[0, 1]),
                           "hd95_mm": float(surf["hd95"][0, 0]), "hd_mm": float(surf["hd"][0, 0])})
        if len(examples) < keep_examples:
            examples.append((image.numpy(), mask.numpy(), pred.numpy()))
    return pd.DataFrame(image_rows), pd.DataFrame(tile_rows), examples


def paired_difference(diff, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``diff`` ``(S seeds, N images)`` and its 95% percentile bootstrap interval.

    Each resample draws seeds and images with replacement (both are sources of noise:
    which network the seed gave, which images the test split holds). Returns
    ``(mean, low, high)``; ``nan``s for an empty array.
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))
    i_idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
    stats = np.array([d[np.ix_(s, i)].mean() for s, i in zip(s_idx, i_idx)])
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def verdict(low: float, high: float) -> str:
    """``within noise`` when the interval holds 0, else ``higher`` / ``lower``."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if low <= 0 <= high:
        return "within noise"
    return "higher" if low > 0 else "lower"


def _pm(values, fmt: str = ".3f") -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    sd = v.std(ddof=1) if v.size > 1 else float("nan")
    return f"{v.mean():{fmt}} ± {sd:{fmt}}" if np.isfinite(sd) else f"{v.mean():{fmt}}"


def summarize(per_image: pd.DataFrame, per_tile: pd.DataFrame, names) -> pd.DataFrame:
    """The demo's table (:data:`TABLE_COLUMNS`) from the per-image and per-tile results of every run.

    ``per_image``: ``method, seed, image_id, dice, iou, hd95_mm``; ``per_tile``: ``method,
    seed, head, pred_pixels``. Dice, IoU, HD95 (finite values only) and the false-head
    rate (head-free tiles with a pixel predicted as head) are mean +- sd over seeds of
    the per-seed mean; the Dice difference pairs each image and seed with the baseline's.
    """
    rows = []
    base = per_image[per_image["method"] == names[0]].pivot(index="seed", columns="image_id", values="dice")
    for name in names:
        img = per_image[per_image["method"] == name]
        til = per_tile[(per_tile["method"] == name) & ~per_tile["head"]]
        by_seed = img.groupby("seed")
        hd = img[np.isfinite(img["hd95_mm"])].groupby("seed")["hd95_mm"].mean()
        false_head = til.assign(fp=til["pred_pixels"] > 0).groupby("seed")["fp"].mean()
        row = {"method": name, "Dice": _pm(by_seed["dice"].mean()), "IoU": _pm(by_seed["iou"].mean()),
               "HD95 (mm)": _pm(hd, ".2f"), "false head": _pm(false_head, ".2f")}
        if name == names[0]:
            row.update({"ΔDice vs baseline [95% CI]": "—", "verdict": "—"})
        else:
            mine = img.pivot(index="seed", columns="image_id", values="dice")
            seeds = base.index.intersection(mine.index)
            mean, lo, hi = paired_difference((mine.loc[seeds, base.columns] - base.loc[seeds]).to_numpy())
            row.update({"ΔDice vs baseline [95% CI]": f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]", "verdict": verdict(lo, hi)})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _load() -> str:
    try:
        return "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def run_demo(out="runs/demo", steps=None, methods=None, threads=None, quick=False, seeds=None,
             configs=None) -> pd.DataFrame:
    """Train every run of :data:`RUNS` (or ``methods``) with seeds ``0..seeds-1``, evaluate, report.

    Writes ``report.md`` (the printed table and notes), ``comparison.csv`` (the table),
    ``per_image.csv``, ``per_tile.csv``, ``curves.png`` and ``overlays.png`` (seed 0) under
    ``out``; returns the table.
    """
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = int(DEFAULT_SEEDS if seeds is None else seeds)
    if seeds < 1:
        raise SystemExit(f"mtseg demo: --seeds must be at least 1, got {seeds}")
    steps = int(steps) if steps else (6 if quick else None)
    names = list(RUNS) if not methods else [m for m in RUNS if m in methods or _slug(m) in methods]
    if not names:
        raise SystemExit(f"mtseg demo: no run matches {methods}; runs: {list(RUNS)}")
    if "baseline" not in names:
        names = ["baseline"] + names  # the comparisons are against it
    cfgs = {(n, s): demo_config(n, out, s, steps, configs) for n in names for s in range(seeds)}
    first = cfgs[(names[0], 0)]
    steps = int(first["train"]["steps"])
    start_load = _load()
    print(f"mtseg demo: {len(names)} methods x {seeds} seeds, UNets of {steps} steps on the embedded HC18 sample cut "
          f"into 80x80 tiles (139 / 20 / 40 images, CC BY 4.0), CPU, {torch.get_num_threads()} threads -> {out}; "
          f"{start_load}", flush=True)
    images, tiles, examples, folders, rounds = [], [], {}, {}, {}
    t_all = time.perf_counter()
    for name in names:
        for seed in range(seeds):
            cfg = cfgs[(name, seed)]
            trainer = build_trainer(cfg)
            trainer.fit()
            img, til, ex = evaluate_tiles(cfg, keep_examples=4 if seed == 0 else 0)
            images.append(img.assign(method=name, seed=seed))
            tiles.append(til.assign(method=name, seed=seed))
            if seed == 0:
                examples[name], folders[name] = ex, cfg["train"]["out_dir"]
                r = Path(cfg["train"]["out_dir"]) / "rounds.csv"
                if r.is_file():
                    rounds[name] = pd.read_csv(r)
            print(f"  {name}, seed {seed}: test Dice {img['dice'].mean():.4f} (best validation at step "
                  f"{trainer.best_step})", flush=True)
    per_image, per_tile = pd.concat(images, ignore_index=True), pd.concat(tiles, ignore_index=True)
    per_image.to_csv(out / "per_image.csv", index=False)
    per_tile.to_csv(out / "per_tile.csv", index=False)
    table = summarize(per_image, per_tile, names)
    table.to_csv(out / "comparison.csv", index=False)
    plot_curves(folders, out / "curves.png")
    plot_overlays(examples, out / "overlays.png")
    total = time.perf_counter() - t_all
    text = format_table(table)
    n_img = per_image.groupby(["method", "seed"]).size().iloc[0]
    n_tiles = per_tile.groupby(["method", "seed"]).size().iloc[0]
    n_free = int((~per_tile[(per_tile["method"] == names[0]) & (per_tile["seed"] == 0)]["head"]).sum())
    notes = report_notes(steps=steps, seeds=seeds, n_images=int(n_img), n_tiles=int(n_tiles), n_free=n_free)
    pres = per_tile[(per_tile["method"] == "+presence/sync") & per_tile["presence_prob"].notna()]
    if len(pres):
        acc = ((pres["presence_prob"] > 0.5) == pres["head"]).groupby(pres["seed"]).mean()
        notes.append(f"+presence/sync's presence head on the test tiles: accuracy {_pm(acc)} (head in "
                     f"{pres['head'].mean():.0%} of them)")
    for name, r in rounds.items():
        notes.append(f"{name}: Dice of the approximations of the weak training tiles vs their true masks by round "
                     f"(seed 0): " + " -> ".join(f"{d:.3f}" for d in r["dice_vs_true"]))
    notes.append(f"what each auxiliary task sees: " + "; ".join(f"{n}: {SEES[n]}" for n in names))
    timing = (f"wall time {total:.0f} s for {len(names) * seeds} runs; per-method times are not shown (the machine's "
              f"load, not the method, dominates them): {start_load} at the start, {_load()} at the end")
    report = "# mtseg demo (embedded HC18 sample)\n\n" + format_report(text, notes) + f"\n{timing}\n"
    (out / "report.md").write_text(report)
    (out / "demo.yaml").write_text(yaml.safe_dump({"steps": steps, "seeds": seeds, "runs": names, "total_s": total}))
    print()
    print(format_report(text, notes))
    print(timing)
    print(f"report: {out / 'report.md'}, per_image.csv, per_tile.csv, curves.png, overlays.png, per-run folders")
    return table


def report_notes(*, steps: int, seeds: int, n_images: int, n_tiles: int, n_free: int) -> list[str]:
    """The notes printed under the table (the README's demo section repeats them)."""
    return [
        f"{steps} steps x batch 8 per run, seeds 0..{seeds - 1}; test: {n_images} images = {n_tiles} tiles of 80x80, "
        f"{n_free} of them without the head",
        f"Dice, IoU, HD95 (mm): per image, on its prediction stitched from its tiles; mean ± sd over the {seeds} "
        f"seeds of the mean over images (HD95 over images where both masks hold the head)",
        "false head: share of the head-free test tiles where any pixel is predicted as head",
        f"ΔDice: per-image Dice minus the baseline's with the same seed, mean over seeds and images; 95% interval "
        f"from {BOOTSTRAP} bootstrap resamples of seeds and images; within noise = the interval contains 0",
    ]


def format_report(table_text: str, notes) -> str:
    """The table and its notes as Markdown (what the demo prints and the README shows)."""
    return table_text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
