"""``mtseg``: train, evaluate, precompute labels, benchmark, and the demo.

    mtseg train --config configs/hc18_unet_baseline.yaml --set optim.lr=1e-3 train.steps=2000
    torchrun --nproc_per_node=2 -m mtseg_harness.cli train --config ...   # DDP (gloo on CPU)
    mtseg eval  --config configs/hc18_unet_baseline.yaml [--checkpoint runs/x/best.pt] [--split test]
    mtseg labels --config configs/cadis_task2_u2net_hog.yaml --out labels/ --kind hog presence weak
    mtseg bench [--size 256 256] [--batch 4] [--methods baseline hog_mtl tdsnet cmunet]
    mtseg demo  [--out runs/demo] [--steps N] [--seeds N]
    mtseg config --config configs/hc18_unet_hog.yaml --set optim.lr=1e-3   # the resolved, checked config

Overrides: ``--set key.sub=value`` (repeatable, several per flag) or bare ``key=value``
arguments; values are YAML (``optim.lr=1e-3``, ``data.input_size=[80,120]``).

Errors: a user error (a bad config key or value, a missing data root, a device this
machine lacks, a bad data file, a wrong command line) is one line on stderr -- what was
expected, what was given, what to do -- and a non-zero exit: 2 for the command line and
the config, 1 otherwise. ``--debug`` (before or after the command) shows the traceback.

This module is the top layer (``cli -> runs -> training -> ...``) and imports only the
standard library until the command runs: a missing package of the ``[harness]`` extra is
reported in one line, not as a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

#: Modules of the ``[harness]`` extra (setup.py) the commands import -> their pip package.
HARNESS_EXTRA = {"yaml": "pyyaml", "pydantic": "pydantic", "scipy": "scipy", "pandas": "pandas", "nibabel": "nibabel",
                 "skimage": "scikit-image", "matplotlib": "matplotlib", "tqdm": "tqdm", "PIL": "pillow",
                 "cv2": "opencv-python-headless"}


def missing_extra(modules=HARNESS_EXTRA) -> list[str]:
    """pip packages of the ``[harness]`` extra whose module cannot be found."""
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or broken
            found = False
        if not found:
            missing.append(package)
    return missing


def _missing_message(packages) -> str:
    return (f"mtseg: the harness needs {', '.join(packages)} (the [harness] extra), not installed here; "
            f"install it with: pip install --no-build-isolation -e '.[harness]'")


class _Parser(argparse.ArgumentParser):
    """argparse, with a command-line mistake in one line (instead of the usage block + error)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _add_config(p):
    p.add_argument("--config", "-c", help="YAML config (see configs/); defaults apply without one")
    p.add_argument("--set", "-s", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set optim.lr=1e-3 train.steps=100")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")


def _overrides(args) -> list[str]:
    return list(args.set) + list(args.overrides)


def cmd_config(runs, args) -> int:
    print(runs.dump(runs.load_config(args.config, _overrides(args))), end="")
    return 0


def cmd_train(runs, args) -> int:
    cfg = runs.load_config(args.config, _overrides(args))
    if args.print_config:
        print(runs.dump(cfg), end="")
        return 0
    if args.seeds:
        for r in runs.train_seeds(cfg, args.seeds):
            print(f"seed {r['seed']}: trained {r['step']} steps; run folder: {r['out_dir']}")
        return 0
    trainer, result = runs.train(cfg)
    if trainer.is_main:
        print(f"trained {result['step']} steps; best validation Dice {result['best']:.4f} at step {result['best_step']}"
              if result["best_step"] is not None else f"trained {result['step']} steps")
        print(f"run folder: {trainer.out_dir}")
    return 0


def cmd_eval(runs, args) -> int:
    if args.config is None and args.checkpoint:
        cfg = runs.config_from_checkpoint(args.checkpoint, _overrides(args))
    else:
        cfg = runs.load_config(args.config, _overrides(args))
    if args.seeds:
        if args.checkpoint or args.out:
            raise runs.ConfigError("mtseg eval --seeds: each run's checkpoint (eval.checkpoint) and folder are used; "
                                   "drop --checkpoint/--out")
        runs.eval_seeds(cfg, args.seeds, args.split)
        return 0
    runs.run_eval(cfg, args.checkpoint, args.split, args.out, keep_examples=int(cfg["eval"]["overlays"]))
    return 0


def cmd_labels(runs, args) -> int:
    cfg = runs.load_config(args.config, _overrides(args))
    written = runs.precompute_labels(cfg, args.out, kinds=args.kind, split_key=args.split)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def cmd_bench(runs, args) -> int:
    print(runs.bench_report(args.methods, repeat=args.repeat, size=tuple(args.size), batch=args.batch, model=args.model,
                            base_channels=args.base_channels, threads=args.threads))
    return 0


def cmd_demo(runs, args) -> int:
    runs.run_demo(out=args.out, steps=args.steps, methods=args.methods, threads=args.threads, quick=args.quick,
                  seeds=args.seeds, configs=args.configs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtseg", description="mtseg-kernels harness: multi-task segmentation training "
                "and evaluation with on-device auxiliary labels")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # the same flag after the command; SUPPRESS keeps a --debug given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, parents=[debug], **kw)  # noqa: E731

    t = add("train", help="train a config (torchrun for several processes)")
    _add_config(t)
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--seeds", nargs="+", type=int, metavar="N",
                   help="train once per seed, each in <train.out_dir>/seed-N (papers' mean +- sd over runs)")
    t.set_defaults(func=cmd_train)

    c = add("config", help="print the resolved config (defaults, presets, base files, overrides), checked")
    _add_config(c)
    c.set_defaults(func=cmd_config)

    e = add("eval", help="evaluate a trained run: per-image/per-class CSV, summary, overlays")
    _add_config(e)
    e.add_argument("--checkpoint", help="checkpoint (default: <train.out_dir>/best.pt, else last.pt)")
    e.add_argument("--split", choices=["train", "val", "test"], help="which split (default eval.split)")
    e.add_argument("--out", help="output folder (default <train.out_dir>/eval_<split>)")
    e.add_argument("--seeds", nargs="+", type=int, metavar="N",
                   help="evaluate the runs of train --seeds and print mean +- sd over them")
    e.set_defaults(func=cmd_eval)

    l = add("labels", help="precompute HOG / presence / weak labels to disk")
    _add_config(l)
    l.add_argument("--out", required=True, help="output folder")
    l.add_argument("--kind", nargs="+", default=["hog", "presence", "weak"], choices=["hog", "presence", "weak"])
    l.add_argument("--split", default="train", choices=["train", "val", "test"])
    l.set_defaults(func=cmd_labels)

    b = add("bench", help="time a training step per method (synthetic data)")
    b.add_argument("--methods", nargs="+", default=["baseline", "hog_mtl", "tdsnet", "cmunet"])
    b.add_argument("--model", default="unet")
    b.add_argument("--base-channels", type=int, default=16)
    b.add_argument("--size", nargs=2, type=int, default=[256, 256])
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--threads", type=int)
    b.set_defaults(func=cmd_bench)

    d = add("demo", help="train and compare methods on the embedded HC18 sample (CPU, minutes)")
    d.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    d.add_argument("--steps", type=int, help="training steps per method (default: the demo's setting)")
    d.add_argument("--methods", nargs="+", help="subset of the demo's runs (the baseline always runs)")
    d.add_argument("--seeds", type=int, help="seeds per method, 0..N-1 (default 3)")
    d.add_argument("--configs", help="folder of the demo's configs (default: configs/ of the source tree)")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--quick", action="store_true", help="a few steps each, to check the pipeline")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_extra()
    if missing:
        print(_missing_message(missing), file=sys.stderr)
        return 1
    # the one place the harness is imported: its packages are all there (checked above)
    from . import runs
    from .config import ConfigError

    try:
        return int(args.func(runs, args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mtseg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line; --debug shows where it came from
        if args.debug:
            raise
        if isinstance(exc, ConfigError):
            print(f"mtseg: config error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, runs.CheckpointError):  # a checkpoint that cannot be used: one line naming it
            print(f"mtseg: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
            return 2
        if isinstance(exc, runs.DatasetError):
            print(f"mtseg: data error: {_one_line(exc)} (data.options.on_error=skip leaves bad samples out; "
                  f"--debug shows the traceback)", file=sys.stderr)
            return 1
        print(f"mtseg: error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
