"""Repeated runs of one config with several seeds, and their mean +- sd (``mtseg train/eval --seeds``).

Papers that report ``mean +- sd over N runs`` (CMU-Net) are reproduced by training the
same config once per seed: run ``s`` has ``seed: s`` and its own folder
``<train.out_dir>/seed-<s>``; a ``{seed}`` in ``model.init_from`` becomes the seed (PU-Net's
second phase starts from the first phase's run of the same seed). Evaluating the repeats
writes each run's tables as ``mtseg eval`` does, then ``<train.out_dir>/seeds_<split>.csv``
(one row per run) and ``seeds_<split>.yaml`` (per metric: mean, sample sd (ddof 1), n,
the values) and prints ``metric mean +- sd (n runs)``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import yaml

from ..training import distributed
from .assemble import build_trainer
from .evaluate import run_eval

#: the summary keys reported across runs (when the evaluation has them)
REPORTED = ("dice_fg", "iou_fg", "miou", "hd95_fg", "assd_fg")


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers >= 0, got {list(seeds)}")
    return seeds


def seed_config(cfg: dict, seed: int) -> dict:
    """``cfg`` for the run of ``seed``: ``seed``, ``train.out_dir/seed-<seed>``, ``{seed}`` in ``model.init_from``."""
    out = copy.deepcopy(cfg)
    out["seed"] = int(seed)
    out["train"]["out_dir"] = str(Path(cfg["train"]["out_dir"]) / f"seed-{int(seed)}")
    if out["model"].get("init_from"):
        out["model"]["init_from"] = str(out["model"]["init_from"]).replace("{seed}", str(int(seed)))
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1; nan for one value) of the finite ``values``, and their count."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def train_seeds(cfg: dict, seeds: Sequence[int]) -> list[dict]:
    """Train ``cfg`` once per seed (one after the other); the :meth:`~mtseg_harness.training.Trainer.fit` results."""
    results = []
    for s in _check_seeds(seeds):
        trainer = build_trainer(seed_config(cfg, s))
        try:
            results.append({"seed": s, "out_dir": str(trainer.out_dir), **trainer.fit()})
        finally:
            distributed.cleanup()
    return results


def eval_seeds(cfg: dict, seeds: Sequence[int], split_key: str | None = None, quiet: bool = False) -> dict:
    """Evaluate each seed's run of ``cfg`` (its ``eval.checkpoint``) and summarise across runs.

    Returns ``{metric: {"mean", "sd", "n", "values"}}`` for the metrics of :data:`REPORTED`
    the evaluation gives; writes ``seeds_<split>.csv``/``.yaml`` in ``train.out_dir``.
    """
    split_key = split_key or cfg["eval"]["split"]
    rows = []
    for s in _check_seeds(seeds):
        _, summary, _ = run_eval(seed_config(cfg, s), split_key=split_key, keep_examples=0, quiet=True)
        rows.append({"seed": s, **{k: summary.get(k) for k in REPORTED if k in summary}})
    if distributed.env_world()[0] != 0:
        return {}
    table = pd.DataFrame(rows)
    result = {}
    for k in REPORTED:
        if k in table:
            mean, sd, n = mean_sd(table[k].tolist())
            result[k] = {"mean": mean, "sd": sd, "n": n, "values": [float(v) for v in table[k]]}
    out = Path(cfg["train"]["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"seeds_{split_key}.csv", index=False)
    (out / f"seeds_{split_key}.yaml").write_text(yaml.safe_dump({"split": split_key, "seeds": [r["seed"] for r in rows],
                                                                 "sd": "sample (ddof 1) over runs", **result},
                                                                sort_keys=False))
    if not quiet:
        for k, v in result.items():
            print(f"{split_key} {k}: {v['mean']:.4f} ± {v['sd']:.4f} ({v['n']} runs)")
        print(f"tables in {out}")
    return result
