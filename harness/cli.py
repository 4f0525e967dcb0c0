"""``mtseg``: train, evaluate, precompute labels, benchmark, and the demo.

    mtseg train --config configs/hc18_unet_baseline.yaml --set optim.lr=1e-3 train.steps=2000
    torchrun --nproc_per_node=2 -m mtseg_harness.cli train --config ...   # DDP (gloo on CPU)
    mtseg eval  --config configs/hc18_unet_baseline.yaml [--checkpoint runs/x/best.pt] [--split test]
    mtseg labels --config configs/cadis_task2_u2net_hog.yaml --out labels/ --kind hog presence weak
    mtseg bench [--size 256 256] [--batch 4] [--methods baseline hog_mtl tdsnet cmunet]
    mtseg demo  [--out runs/demo] [--steps N]

Overrides: ``--set key.sub=value`` (repeatable, several per flag) or bare ``key=value``
arguments; values are YAML (``optim.lr=1e-3``, ``data.input_size=[80,120]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_config(p):
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply without one")
    p.add_argument("--set", "-s", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.lr=1e-3 train.steps=100")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")


def _config(args):
    from .config import load_config

    return load_config(args.config, list(args.set) + list(args.overrides))


def cmd_train(args) -> int:
    from .training import Trainer
    from .training import distributed as D

    cfg = _config(args)
    trainer = Trainer(cfg)
    result = trainer.fit()
    if trainer.is_main:
        print(f"trained {result['step']} steps; best validation Dice {result['best']:.4f} at step {result['best_step']}"
              if result["best_step"] is not None else f"trained {result['step']} steps")
        print(f"run folder: {trainer.out_dir}")
    D.cleanup()
    return 0


def build_for_eval(cfg, checkpoint=None, split_key: str = "test"):
    """(model, method, dataset, device) for evaluating a trained run."""
    import torch

    from .methods import create_method
    from .models import create_model
    from .training import model_weights, resolve_device
    from .training.data import build_dataset

    dataset = build_dataset(cfg, split_key)
    method = create_method(cfg["method"]["name"], dataset.num_classes, getattr(dataset, "ignore_index", 255),
                           **{k: v for k, v in cfg["method"].items() if k != "name"})
    heads = {**method.heads(), **(cfg["model"].get("heads") or {})}
    model = create_model(cfg["model"]["name"], int(dataset[0]["image"].shape[0]), dataset.num_classes, heads=heads,
                         **(cfg["model"].get("options") or {}))
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(model_weights(state))
        if isinstance(state, dict) and "method" in state:
            method.load_state_dict(state["method"])
    device = resolve_device(cfg.get("device", "auto"))
    return model.to(device), method, dataset, device


def run_eval(cfg, checkpoint=None, split_key=None, out_dir=None, keep_examples: int = 4, quiet: bool = False):
    """Evaluate and write per_image.csv, per_class.csv, summary.yaml (and overlays.png) to ``out_dir``."""
    import yaml

    from .evaluation import evaluate
    from .evaluation.report import per_class_table, plot_overlays
    from .training.data import eval_loader

    split_key = split_key or cfg["eval"]["split"]
    run = Path(cfg["train"]["out_dir"])
    if checkpoint is None:
        checkpoint = run / f"{cfg['eval']['checkpoint']}.pt"
        if not checkpoint.is_file():
            checkpoint = run / "last.pt"
    model, method, dataset, device = build_for_eval(cfg, checkpoint, split_key)
    names = list(dataset.class_names)
    table, summary, examples = evaluate(model, method, eval_loader(dataset, cfg), device, dataset.num_classes,
                                        getattr(dataset, "ignore_index", 255), names, hd=bool(cfg["eval"]["hd"]),
                                        pad_multiple=int(cfg["eval"]["pad_multiple"]), keep_examples=keep_examples,
                                        input_size=cfg["data"].get("input_size"),
                                        objects=cfg["data"]["name"] == "glas", brats=cfg["data"]["name"] == "brats18")
    out = Path(out_dir) if out_dir else run / f"eval_{split_key}"
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


def cmd_eval(args) -> int:
    from .config import load_config, resolve

    if args.config is None and args.checkpoint:
        import torch

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        from .config import apply_overrides

        cfg = resolve(apply_overrides(state["config"], list(args.set) + list(args.overrides)))
    else:
        cfg = _config(args)
    run_eval(cfg, args.checkpoint, args.split, args.out)
    return 0


def cmd_labels(args) -> int:
    from .training.labels import precompute_labels

    cfg = _config(args)
    written = precompute_labels(cfg, args.out, kinds=args.kind, split_key=args.split)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .evaluation.report import format_table
    from .training.bench import time_steps

    import pandas as pd

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = time_steps(args.methods, repeat=args.repeat, size=tuple(args.size), batch=args.batch, model=args.model,
                      model_options={"base_channels": args.base_channels} if args.model.startswith("unet") else None)
    print(f"training step, {args.model}, batch {args.batch}, {args.size[0]}x{args.size[1]}, "
          f"{torch.get_num_threads()} threads, CPU" + (" (median of %d)" % args.repeat))
    print(format_table(pd.DataFrame(rows), ".4f"))
    return 0


def cmd_demo(args) -> int:
    from .training.demo import run_demo

    run_demo(out=args.out, steps=args.steps, methods=args.methods, threads=args.threads, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtseg", description="mtseg-kernels harness: multi-task segmentation training "
                                "and evaluation with on-device auxiliary labels")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config (torchrun for several processes)")
    _add_config(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run: per-image/per-class CSV, summary, overlays")
    _add_config(e)
    e.add_argument("--checkpoint", help="checkpoint (default: <train.out_dir>/best.pt, else last.pt)")
    e.add_argument("--split", choices=["train", "val", "test"], help="which split (default eval.split)")
    e.add_argument("--out", help="output folder (default <train.out_dir>/eval_<split>)")
    e.set_defaults(func=cmd_eval)

    l = sub.add_parser("labels", help="precompute HOG / presence / weak labels to disk")
    _add_config(l)
    l.add_argument("--out", required=True, help="output folder")
    l.add_argument("--kind", nargs="+", default=["hog", "presence", "weak"], choices=["hog", "presence", "weak"])
    l.add_argument("--split", default="train", choices=["train", "val", "test"])
    l.set_defaults(func=cmd_labels)

    b = sub.add_parser("bench", help="time a training step per method (synthetic data)")
    b.add_argument("--methods", nargs="+", default=["baseline", "hog_mtl", "tdsnet", "cmunet"])
    b.add_argument("--model", default="unet")
    b.add_argument("--base-channels", type=int, default=16)
    b.add_argument("--size", nargs=2, type=int, default=[256, 256])
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--threads", type=int)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="train and compare methods on the embedded HC18 sample (CPU, minutes)")
    d.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    d.add_argument("--steps", type=int, help="training steps per method (default: the demo's setting)")
    d.add_argument("--methods", nargs="+", help="subset of the demo's runs")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--quick", action="store_true", help="a few steps each, to check the pipeline")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mtseg: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
