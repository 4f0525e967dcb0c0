"""``mtseg eval``: evaluate a trained run and write its tables (the one evaluation entry of a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml

from ..evaluation import evaluate
from ..evaluation.report import per_class_table, plot_overlays
from ..training import load_checkpoint, model_weights, resolve_device
from ..training.data import eval_loader
from .assemble import build_run, load_config


def config_from_checkpoint(path, overrides: Iterable[str] = ()) -> dict:
    """The config a checkpoint was trained with, with ``overrides`` applied."""
    return load_config(None, overrides, base=load_checkpoint(path)["config"])


def run_eval(cfg: dict, checkpoint=None, split_key: str | None = None, out_dir=None, keep_examples: int = 4,
             quiet: bool = False):
    """Evaluate ``cfg``'s run on a split; write per_image.csv, per_class.csv, summary.yaml (and overlays.png).

    ``checkpoint``: default ``<train.out_dir>/<eval.checkpoint>.pt``, else ``last.pt``;
    ``split_key``: default ``eval.split``; ``out_dir``: default ``<train.out_dir>/eval_<split>``.
    Returns ``(table, summary, examples)`` of :func:`~mtseg_harness.evaluation.evaluate`,
    with the dataset's declared extras (object metrics, regions, per-group reports).
    """
    split_key = split_key or cfg["eval"]["split"]
    run_dir = Path(cfg["train"]["out_dir"])
    if checkpoint is None:
        checkpoint = run_dir / f"{cfg['eval']['checkpoint']}.pt"
        if not checkpoint.is_file():
            checkpoint = run_dir / "last.pt"
    run = build_run(cfg, split_key)
    state = load_checkpoint(checkpoint)
    run.model.load_state_dict(model_weights(state))
    if isinstance(state, dict) and "method" in state:
        run.method.load_state_dict(state["method"])
    device = resolve_device(cfg.get("device", "auto"))
    ds = run.dataset
    names = list(ds.class_names)
    table, summary, examples = evaluate(run.model.to(device), run.method.segment, eval_loader(ds, cfg), device,
                                        num_classes=ds.num_classes, ignore_index=ds.ignore_index, class_names=names,
                                        hd=bool(cfg["eval"]["hd"]), pad_multiple=int(cfg["eval"]["pad_multiple"]),
                                        keep_examples=keep_examples, input_size=cfg["data"].get("input_size"),
                                        extra_metrics=ds.extra_metrics)
    out = Path(out_dir) if out_dir else run_dir / f"eval_{split_key}"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "per_image.csv", index=False)
    per_class_table(summary, names).to_csv(out / "per_class.csv", index=False)
    (out / "summary.yaml").write_text(yaml.safe_dump({"checkpoint": str(checkpoint), **summary}, sort_keys=False))
    if examples:
        plot_overlays({cfg["method"]["name"]: examples}, out / "overlays.png")
    if not quiet:
        keys = [k for k in ("dice_fg", "iou_fg", "miou", "hd95_fg") if k in summary]
        print(f"{split_key}: " + ", ".join(f"{k} {summary[k]:.4f}" for k in keys) + f"  ({summary['n_images']} images)")
        print(f"tables in {out}")
    return table, summary, examples
