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


def paper_comparison(summary: dict, paper: dict | None) -> pd.DataFrame:
    """This run's numbers beside the paper's (``eval.paper``), one row per group and ``all``.

    ``summary``: of :func:`~.evaluate.evaluate`; ``paper``: ``{source, metric, group, values}``.
    With a ``group`` (e.g. ``video``) every group of ``summary["by_<group>"]`` gets a row
    (the metric over that group's images) and ``all`` the mean of those group values (the
    paper's "mean" column); without, one row ``all`` (the metric over the split). Columns:
    ``group``, ``metric``, ``ours``, ``paper`` (``nan`` where the paper's number is not known).
    """
    if not paper:
        return pd.DataFrame()
    metric, group = paper["metric"], paper.get("group")
    known = {str(k): v for k, v in (paper.get("values") or {}).items()}

    def value(mean: dict) -> float:
        if metric not in mean:
            raise KeyError(f"eval.paper.metric {metric!r} is not in the evaluation summary "
                           f"(known: {sorted(k for k, v in mean.items() if isinstance(v, float))})")
        return float(mean[metric])

    rows = []
    if group:
        parts = summary.get(f"by_{group}")
        if parts is None:
            raise KeyError(f"eval.paper.group {group!r}: the dataset reports no such group "
                           f"(known: {sorted(k[3:] for k in summary if k.startswith('by_'))})")
        for g in sorted(parts, key=lambda x: (str(type(x)), x)):
            rows.append({"group": f"{group} {g}", "metric": metric, "ours": value(parts[g]),
                         "paper": known.get(str(g))})
        ours = float(np.mean([r["ours"] for r in rows])) if rows else float("nan")
        rows.append({"group": "all", "metric": f"mean {metric} over {group}s", "ours": ours, "paper": known.get("all")})
    else:
        rows.append({"group": "all", "metric": metric, "ours": value(summary), "paper": known.get("all")})
    df = pd.DataFrame(rows)
    df["paper"] = df["paper"].astype(float)
    df["source"] = paper["source"]
    return df


def paper_lines(df: pd.DataFrame) -> list[str]:
    """Printable lines of :func:`paper_comparison`: ``video 9: miou 0.8123 (paper 0.8000)``."""
    lines = [f"paper's numbers: {df['source'].iloc[0]}"] if len(df) else []
    for r in df.itertuples():
        theirs = "not known to us" if math.isnan(r.paper) else f"{r.paper:.4f}"
        lines.append(f"  {r.group}: {r.metric} {r.ours:.4f}  (paper {theirs})")
    return lines


#: train_log.csv columns that are not terms of a loss.
_NOT_LOSS_TERMS = {"step", "loss", "lr", "img_s", "grad_norm", "seg_all", "round", "stage"}


def loss_terms(columns) -> list[str]:
    """The loss terms a training log records (``seg``, ``hog``, ``cls``, ...), in log order."""
    return [c for c in columns if c not in _NOT_LOSS_TERMS]


def plot_curves(runs: dict, path, train_key: str = "loss", val_key: str = "dice_fg") -> Path:
    """Training loss and validation score against step, one line per run (``runs``: name -> run folder).

    Each method's loss is its own sum of terms (e.g. baseline ``seg``, HOG-MTL ``seg + hog``):
    the legend names the terms of every run, and when they differ the panel says that the
    curves are not comparable across methods.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    term_sets = []
    for name, folder in runs.items():
        folder = Path(folder)
        if (folder / "train_log.csv").is_file():
            t = pd.read_csv(folder / "train_log.csv")
            if train_key in t:
                terms = loss_terms(t.columns)
                term_sets.append(tuple(terms))
                axes[0].plot(t["step"], t[train_key], label=f"{name}: {' + '.join(terms)}" if terms else name)
        if (folder / "val_log.csv").is_file():
            v = pd.read_csv(folder / "val_log.csv")
            if val_key in v and len(v):
                axes[1].plot(v["step"], v[val_key], marker="o", label=name)
    title = "training loss"
    if len(set(term_sets)) > 1:
        title += "\n(each method's own sum of terms, see legend: not comparable across methods)"
    axes[0].set(xlabel="step", ylabel=f"training {train_key} (sum of the run's terms)", title=title)
    axes[1].set(xlabel="step", ylabel=f"validation {val_key}", title="validation")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def label_palette(num_classes: int, ignore_index: int = 255) -> list[int]:
    """A 768-value PNG palette for class maps: class 0 black, classes 1..K-1 bright, well
    separated hues, ``ignore_index`` white. The pixel values stay the class ids."""
    pal = np.zeros((256, 3), np.uint8)
    for k in range(1, min(num_classes, 256)):
        hue = ((k - 1) * 0.61803398875) % 1.0  # golden-ratio steps: neighbours differ
        h6 = hue * 6
        x = 1 - abs(h6 % 2 - 1)
        r, g, b = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h6) % 6]
        pal[k] = np.round(np.array([r, g, b]) * 255)
    if 0 <= ignore_index < 256:
        pal[ignore_index] = 255
    return pal.reshape(-1).tolist()


def _outline(labels: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Pixels whose class differs from a 4-neighbour's, the outside of the image counting as
    different (so a mask covering the whole image is outlined along the border);
    ignored pixels are neither outlined nor count as a class."""
    lab = labels.astype(np.int64)
    if ignore_index is not None:
        lab = np.where(lab == ignore_index, -2, lab)
    padded = np.pad(lab, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        other = padded[dy:dy + lab.shape[0], dx:dx + lab.shape[1]]
        edge |= (other != centre) & (other != -2)
    return edge & (centre != -2) & (centre != 0)


def _image_dice(target: np.ndarray, pred: np.ndarray, background_classes, ignore_index) -> float:
    """Mean Dice over the non-background classes present in either map (ignored pixels left out)."""
    valid = target != ignore_index
    classes = set(np.unique(target[valid]).tolist()) | set(np.unique(pred[valid]).tolist())
    classes -= set(background_classes)
    scores = []
    for c in sorted(classes):
        t, p = (target == c) & valid, (pred == c) & valid
        scores.append(2 * (t & p).sum() / max(t.sum() + p.sum(), 1))
    return float(np.mean(scores)) if scores else float("nan")


def overlay_figure(examples: dict, max_rows: int = 4, background_classes=(0,), ignore_index: int = 255):
    """The figure of :func:`plot_overlays` (returned open, for callers that add to it)."""
    plt = _plt()
    names = list(examples)
    n = min(max_rows, min(len(v) for v in examples.values())) if names else 0
    if n == 0:
        raise ValueError("plot_overlays: no examples")
    fig, axes = plt.subplots(n, len(names), figsize=(3.2 * len(names), 2.6 * n + 0.5), squeeze=False)
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
            # background classes are not outlined (the edge between two structures is)
            bg = set(background_classes)
            t_lab = np.where(np.isin(tgt, list(bg)), 0, tgt + 1) if bg else tgt + 1
            p_lab = np.where(np.isin(pred, list(bg)), 0, pred + 1) if bg else pred + 1
            # pixels the target ignores count in neither outline (as in the metrics)
            t_lab = np.where(tgt == ignore_index, ignore_index + 1, t_lab)
            p_lab = np.where(tgt == ignore_index, ignore_index + 1, p_lab)
            layer = np.zeros(tgt.shape + (4,))
            layer[_outline(t_lab, ignore_index + 1)] = (0.0, 1.0, 0.0, 1.0)   # ground truth: green
            layer[_outline(p_lab, ignore_index + 1)] = (1.0, 0.0, 0.0, 1.0)   # prediction: red
            ax.imshow(layer, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            dice = _image_dice(tgt, pred, background_classes, ignore_index)
            ax.set_title((f"{name}\n" if i == 0 else "") + f"Dice {dice:.3f}", fontsize=8)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="lime", label="ground truth outline"),
                        plt.Rectangle((0, 0), 1, 1, color="red", label="prediction outline")],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_overlays(examples: dict, path, max_rows: int = 4, background_classes=(0,), ignore_index: int = 255) -> Path:
    """Qualitative overlays: a row per image, a column per run; outlines of the ground truth
    (green) and of the prediction (red) of every non-background class, a legend, and each
    image's Dice (mean over the non-background classes in either map) in its title.

    A mask that touches the image border (or covers the whole image) is outlined along
    the border. Volumes show their middle slice; 3-channel images are shown in colour,
    others by their first channel.

    ``examples``: run name -> list of ``(image (C, H, W), target (H, W), prediction (H, W))``.
    """
    fig = overlay_figure(examples, max_rows, background_classes, ignore_index)
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
