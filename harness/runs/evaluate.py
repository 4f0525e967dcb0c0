"""``mtseg eval``: evaluate a trained run and write its tables (the one evaluation entry of a run).

The network is always the one the checkpoint was trained with: the config entries that
define it (:data:`NETWORK_KEYS`) come from the checkpoint's stored config, whatever the
given config says (a one-line notice names the keys where they differ); the data (root,
splits) and the evaluation settings come from the given config.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch
import yaml

from ..data import RegionMetrics
from ..evaluation import evaluate, summary_line
from ..evaluation.report import paper_comparison, paper_lines, per_class_table, plot_overlays, write_table
from ..training import distributed, load_checkpoint, resolve_device
from ..training.checkpoint import config_changes, describe_changes, load_model_state, plain
from ..training.data import eval_loader
from .assemble import build_run, load_config

#: What defines the network and what it was trained to read: its architecture and options,
#: the method (heads, how a prediction is made), the dataset's label definition and the
#: input resize. ``mtseg eval`` takes these from the checkpoint.
NETWORK_KEYS = ("model", "method", "data.name", "data.options", "data.input_size")
#: The means `mtseg eval` prints, overall and per group (a key missing from a summary is left out).
REPORT_KEYS = ("dice_fg", "iou_fg", "miou", "hd95_fg", "object_dice", "object_hausdorff")


def config_from_checkpoint(path, overrides: Iterable[str] = ()) -> dict:
    """The config a checkpoint was trained with, with ``overrides`` applied."""
    return load_config(None, overrides, base=load_checkpoint(path, required=("model", "config"))["config"])


def network_config(cfg: Mapping, trained: Mapping, source=None) -> dict:
    """``cfg`` with the :data:`NETWORK_KEYS` of ``trained`` (a checkpoint's config).

    Prints one line naming the keys where ``cfg`` differs (``source``: the checkpoint, for the message).
    """
    changes = config_changes(plain(cfg), plain(trained), keys=NETWORK_KEYS)
    out = copy.deepcopy(dict(cfg))
    for key in NETWORK_KEYS:
        *parents, leaf = key.split(".")
        src, dst = trained, out
        for p in parents:
            src = src.get(p) or {}
            dst = dst.setdefault(p, {})
        if leaf in src:  # (a key the stored config lacks keeps the given value)
            dst[leaf] = copy.deepcopy(src[leaf])
    if changes:
        print(f"evaluating {source or 'the checkpoint'} with the network it was trained with; the given config "
              f"differs there (given -> trained): {describe_changes(changes)}", file=sys.stderr, flush=True)
    return out


def run_eval(cfg: dict, checkpoint=None, split_key: str | None = None, out_dir=None, keep_examples: int = 4,
             quiet: bool = False):
    """Evaluate ``cfg``'s run on a split; write per_image.csv, per_class.csv, summary.yaml (and overlays.png;
    with ``eval.paper``, paper_comparison.csv: the run's numbers beside the paper's, also printed).

    ``checkpoint``: default ``<train.out_dir>/<eval.checkpoint>.pt``, else ``last.pt``;
    ``split_key``: default ``eval.split``; ``out_dir``: default ``<train.out_dir>/eval_<split>``.
    Returns ``(table, summary, examples)`` of :func:`~mtseg_harness.evaluation.evaluate`,
    with the dataset's declared extras (object metrics, regions, per-group reports).
    The network (:data:`NETWORK_KEYS`) is built as the checkpoint's stored config says.
    Under ``torchrun`` each process evaluates its shard of the split and the metrics are
    gathered (every process returns the whole result); only rank 0 writes and prints.
    """
    split_key = split_key or cfg["eval"]["split"]
    run_dir = Path(cfg["train"]["out_dir"])
    if checkpoint is None:
        checkpoint = run_dir / f"{cfg['eval']['checkpoint']}.pt"
        if not checkpoint.is_file():
            checkpoint = run_dir / "last.pt"
    started = distributed.is_distributed()
    state = load_checkpoint(checkpoint, required=("model", "config"))
    cfg = network_config(cfg, state["config"], checkpoint)
    run = build_run(cfg, split_key)
    load_model_state(run.model, state["model"], checkpoint)
    run.method.load_state_dict(state.get("method") or {})
    # under torchrun every process evaluates its shard; the metrics are gathered, rank 0 writes
    rank, world, local_rank = distributed.init_distributed(resolve_device(cfg.get("device", "auto")).type)
    joined = world > 1 and not started
    device = resolve_device(cfg.get("device", "auto"), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ds = run.dataset
    names = list(ds.class_names)
    try:
        table, summary, examples = evaluate(run.model.to(device), run.method.segment,
                                            eval_loader(ds, cfg, rank=rank, world=world), device,
                                            num_classes=ds.num_classes, ignore_index=ds.ignore_index,
                                            class_names=names, hd=bool(cfg["eval"]["hd"]),
                                            pad_multiple=int(cfg["eval"]["pad_multiple"]), keep_examples=keep_examples,
                                            input_size=cfg["data"].get("input_size"), extra_metrics=ds.extra_metrics,
                                            background_classes=ds.background_classes, gather=world > 1,
                                            window=cfg["eval"].get("window"),
                                            window_overlap=float(cfg["eval"].get("window_overlap", 0.5)))
    finally:
        if joined:
            distributed.cleanup()
    if rank != 0:
        return table, summary, examples
    out = Path(out_dir) if out_dir else run_dir / f"eval_{split_key}"
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "per_image.csv")
    write_table(per_class_table(summary, names, ds.background_classes), out / "per_class.csv")
    (out / "summary.yaml").write_text(yaml.safe_dump({"checkpoint": str(checkpoint), **summary}, sort_keys=False))
    if examples:
        plot_overlays({cfg["method"]["name"]: examples}, out / "overlays.png",
                      background_classes=ds.background_classes, ignore_index=ds.ignore_index)
    paper = paper_comparison(summary, cfg["eval"].get("paper"))
    if len(paper):
        write_table(paper, out / "paper_comparison.csv")
    if not quiet:
        print(f"{split_key}: {summary_line(summary, REPORT_KEYS)}")
        for key in [k for k in summary if k.startswith("by_")]:  # per group (GlaS part, video)
            for value, part in summary[key].items():
                print(f"  {key[3:]} {value}: {summary_line(part, REPORT_KEYS)}")
        regions = [name for spec in ds.extra_metrics if isinstance(spec, RegionMetrics) for name, _ in spec.regions]
        if regions:  # the form papers report BraTS / REFUGE in: Dice (and HD95) per region
            keys = tuple(f"{m}_{r}" for m in ("dice", "hd95") for r in regions if f"{m}_{r}" in summary)
            print(f"{split_key} regions: {summary_line(summary, keys)}")
        for line in paper_lines(paper):
            print(line)
        print(f"tables in {out}")
    return table, summary, examples
