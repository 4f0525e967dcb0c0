"""Assembly of a run from its config: the one place a config becomes a dataset, a method and a model.

Every entry point (``mtseg train/eval/labels/bench/demo``, the tests) goes through these:

* :func:`load_config` -- the one config-loading function (file + ``base:`` files +
  overrides, the method's paper defaults as presets, checks);
* :func:`build_dataset` / :func:`build_method` / :func:`build_model` -- the pieces;
* :func:`build_run` -- ``(dataset, method, model)`` for a split;
* :func:`build_trainer` -- a seeded :class:`~mtseg_harness.training.Trainer` with its
  training and validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import nn

from ..config import read_config, resolve
from ..config import method_name as _method_name
from ..data import InMemory, SegmentationDataset, create_dataset, first_sample
from ..methods import Method, create_method, method_class
from ..models import create_model
from ..training import Trainer, seed_everything


def load_config(path=None, overrides: Iterable[str] = (), base: Mapping | None = None) -> dict:
    """Read ``path`` (or start from ``base``/nothing), apply ``overrides`` (``a.b=value``),
    lay it over the defaults and the method's paper defaults; the resolved config."""
    user = read_config(path, overrides, base)
    return resolve(user, presets=[method_class(_method_name(user)).config_defaults])


def build_dataset(cfg: dict, split_key: str) -> SegmentationDataset:
    """The dataset of ``data.splits[split_key]`` (kept in memory with ``data.cache_in_memory``)."""
    d = cfg["data"]
    ds = create_dataset(d["name"], d["root"], split=d["splits"][split_key], **(d.get("options") or {}))
    return InMemory(ds) if d.get("cache_in_memory") else ds


def build_method(cfg: dict, num_classes: int, ignore_index: int) -> Method:
    """The method of the ``method`` section for a dataset with ``num_classes`` classes."""
    options = {k: v for k, v in cfg["method"].items() if k != "name"}
    return create_method(cfg["method"]["name"], num_classes, ignore_index, **options)


def build_model(cfg: dict, method: Method, in_channels: int, num_classes: int) -> nn.Module:
    """The model of the ``model`` section with the method's heads (``model.heads`` laid over them)."""
    m = cfg["model"]
    heads = method.heads().updated(m.get("heads") or {}, who="model.heads")
    return create_model(m["name"], in_channels, num_classes, heads=heads, **(m.get("options") or {}))


@dataclass
class Run:
    """What a config builds for one split."""

    dataset: SegmentationDataset
    method: Method
    model: nn.Module


def build_run(cfg: dict, split_key: str, *, training: bool = False) -> Run:
    """Dataset, method and model of ``cfg`` for ``split_key``.

    ``training``: the method wraps the dataset with what it trains on (e.g. weak labels).
    The model's input channels come from the first sample that reads.
    """
    dataset = build_dataset(cfg, split_key)
    method = build_method(cfg, dataset.num_classes, dataset.ignore_index)
    if training:
        dataset = method.wrap_dataset(dataset, split_key)
    channels = int(first_sample(dataset)["image"].shape[0])
    return Run(dataset, method, build_model(cfg, method, channels, dataset.num_classes))


def build_trainer(cfg: dict, **kwargs) -> Trainer:
    """A :class:`~mtseg_harness.training.Trainer` for ``cfg``: RNGs seeded from ``seed`` before the
    model is built, the training run, the validation set when ``train.val_every`` and
    ``data.splits.val`` ask for one. ``kwargs`` go to the trainer (``device``, ``progress``)."""
    seed_everything(int(cfg["seed"]), bool(cfg["deterministic"]))
    run = build_run(cfg, "train", training=True)
    val = build_dataset(cfg, "val") if cfg["train"]["val_every"] and cfg["data"]["splits"].get("val") else None
    return Trainer(cfg, model=run.model, method=run.method, train_set=run.dataset, val_set=val, **kwargs)
