"""Report files: per-class CSV tables (pandas), training curves and overlays as PNG (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def per_class_table(summary: dict, class_names, background_classes=(0,)) -> pd.DataFrame:
    """One row per class: ``role`` (``class`` or ``background``), then per metric its mean
    and the counts of images where it is undefined (``_n_nan``) or infinite (``_n_inf``,
    distances only), as in :func:`~.evaluate.summarize`. A metric not computed for a
    class (the distances of a background class) is ``nan`` with count ``n/a``."""
    bg = {int(c) for c in background_classes}
    rows = []
    for k, n in enumerate(class_names):
        row = {"class": n, "role": "background" if k in bg else "class", "n_images": summary.get("n_images")}
        for m in ("dice", "iou", "hd95", "hd", "assd"):
            key = f"{m}_{n}"
            if key not in summary and not any(f"{m}_{c}" in summary for c in class_names):
                continue  # a metric not computed at all (hd: false)
            row[m] = summary.get(key, float("nan"))
            row[f"{m}_n_nan"] = summary.get(key + "_n_nan", "n/a")
            if m in ("hd95", "hd", "assd"):
                row[f"{m}_n_inf"] = summary.get(key + "_n_inf", "n/a")
        rows.append(row)
    return pd.DataFrame(rows)


def write_table(df: pd.DataFrame, path) -> Path:
    """A table as CSV with undefined and infinite values written out (``nan``, ``inf``), never blank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, na_rep="nan")
    return path


def plot_curves(runs: dict, path, train_key: str = "loss", val_key: str = "dice_fg") -> Path:
    """Training loss and validation score against step, one line per run (``runs``: name -> run folder)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, folder in runs.items():
        folder = Path(folder)
        if (folder / "train_log.csv").is_file():
            t = pd.read_csv(folder / "train_log.csv")
            if train_key in t:
                axes[0].plot(t["step"], t[train_key], label=name)
        if (folder / "val_log.csv").is_file():
            v = pd.read_csv(folder / "val_log.csv")
            if val_key in v and len(v):
                axes[1].plot(v["step"], v[val_key], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel=f"training {train_key}", title="training loss")
    axes[1].set(xlabel="step", ylabel=f"validation {val_key}", title="validation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_overlays(examples: dict, path, max_rows: int = 4) -> Path:
    """Qualitative overlays: a row per image, a column per run; ground truth outline green, prediction red.

    Volumes show their middle slice; 3-channel images are shown in colour, others by their first channel.

    ``examples``: run name -> list of ``(image (C, H, W), target (H, W), prediction (H, W))``.
    """
    plt = _plt()
    names = list(examples)
    n = min(max_rows, min(len(v) for v in examples.values())) if names else 0
    if n == 0:
        raise ValueError("plot_overlays: no examples")
    fig, axes = plt.subplots(n, len(names), figsize=(3.2 * len(names), 2.4 * n), squeeze=False)
    for j, name in enumerate(names):
        for i in range(n):
            img, tgt, pred = (np.asarray(a) for a in examples[name][i])
            if tgt.ndim == 3:  # a volume: the middle slice along D
                d = tgt.shape[0] // 2
                img, tgt, pred = img[:, d], tgt[d], pred[d]
            ax = axes[i][j]
            if img.shape[0] == 3:
                rgb = img.transpose(1, 2, 0).astype(np.float64)
                ax.imshow((rgb - rgb.min()) / max(np.ptp(rgb), 1e-12))
            else:
                ax.imshow(img[0], cmap="gray")
            ax.contour((tgt > 0) & (tgt != 255), levels=[0.5], colors="lime", linewidths=0.8)
            ax.contour(np.asarray(pred) > 0, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    return _save(plt, fig, path, dpi=100)


def plot_rounds(table: pd.DataFrame, path, x: str = "round", y: str = "dice", title: str = "") -> Path:
    """A metric per round (e.g. Dice of the recursive approximations against the true masks)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(table[x], table[y], marker="o")
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def format_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A plain-text (Markdown) table."""
    cols = list(df.columns)

    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else format(v, floatfmt))
        return str(v)

    rows = [[fmt(v) for v in r] for r in df.itertuples(index=False)]
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line([str(c) for c in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
