"""Assembly of a run from its config: the one place a config becomes a dataset, a method and a model.

Every entry point (``mtseg train/eval/labels/bench/demo``, the tests) goes through these:

* :func:`load_config` -- the one config-loading function (file + ``base:`` files +
  overrides, the method's paper defaults as presets, the schema's checks, then
  :func:`check_components`: names and keyword options of the method, model, dataset and
  augmentation against what they configure);
* :func:`build_dataset` / :func:`build_method` / :func:`build_model` -- the pieces;
* :func:`build_run` -- ``(dataset, method, model)`` for a split;
* :func:`build_trainer` -- a seeded :class:`~mtseg_harness.training.Trainer` with its
  training and validation sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import nn

from ..config import FIX, ConfigError, check_options, keyword_fields, nearest, read_config, resolve
from ..config import method_name as _method_name
from ..data import (BatchAugment, DatasetError, InMemory, SegmentationDataset, create_dataset, dataset_class,
                    first_sample, list_datasets, resolve_root)
from ..methods import Method, create_method, list_methods, method_class
from ..models import HEAD_NAMES, Heads, create_model, get_model_spec, list_models
from ..training import Trainer, seed_everything
from ..training.checkpoint import load_checkpoint

# What the assembly passes itself, so a config cannot set it as an option.
_MODEL_ARGS = ("in_channels", "num_classes", "heads")
_DATASET_ARGS = ("root", "split", "transform")  # transform: a callable, not a YAML value
_AUGMENT_ARGS = ("label_keys", "ignore_index", "seed")  # from the dataset and the run's seed


def load_config(path=None, overrides: Iterable[str] = (), base: Mapping | None = None) -> dict:
    """Read ``path`` (or start from ``base``/nothing), apply ``overrides`` (``a.b=value``),
    lay it over the defaults and the method's paper defaults; the resolved config, every
    key checked (:class:`~mtseg_harness.config.ConfigError` names the first bad ones)."""
    user = read_config(path, overrides, base)
    cls = _registered("method.name", "method", _method_name(user), list_methods(), method_class)
    return check_components(resolve(user, presets=[cls.config_defaults]))


def _registered(key: str, what: str, name, known: list[str], lookup):
    if isinstance(name, str):
        try:
            return lookup(name)
        except ValueError:
            pass
    guess = nearest(str(name), known)
    hint = f" (did you mean {guess}?)" if guess else ""
    raise ConfigError(f"{key}: unknown {what} {name!r}{hint}; known: {', '.join(known)}; {FIX}")


def _checked(options, target, where: str, skip=()) -> dict:
    try:
        return check_options(options, keyword_fields(target, skip), where)
    except ValueError as exc:
        raise ConfigError(f"{exc}; {FIX}") from None


def check_components(cfg: dict) -> dict:
    """``cfg`` with the names and keyword options of what it builds checked: ``method``
    against the method's ``Options`` dataclass, ``model.options`` against the model
    builder's signature, ``model.heads`` against the head specs, ``data.options`` against the dataset adapter's, ``data.augment``
    against :class:`~mtseg_harness.data.BatchAugment`'s. Unknown names (with the nearest
    valid one), types and ranges raise :class:`~mtseg_harness.config.ConfigError`; the
    options come back as plain YAML values."""
    m = cfg["method"]
    method = _registered("method.name", "method", m["name"], list_methods(), method_class)
    options = _checked({k: v for k, v in m.items() if k != "name"}, method.Options, "method")
    cfg["method"] = {"name": m["name"], **options}
    model = cfg["model"]
    spec = _registered("model.name", "model", model["name"], list_models(), get_model_spec)
    model["options"] = _checked(model["options"], spec.builder, "model.options", _MODEL_ARGS)
    for name in model["heads"] or {}:
        if name not in HEAD_NAMES:
            guess = nearest(str(name), HEAD_NAMES)
            hint = f" (did you mean model.heads.{guess}?)" if guess else ""
            raise ConfigError(f"unknown key 'model.heads.{name}'{hint}; valid here: {', '.join(HEAD_NAMES)}; {FIX}")
    try:
        Heads().updated(model["heads"] or {}, who="model.heads")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{exc}; {FIX}") from None
    d = cfg["data"]
    adapter = _registered("data.name", "dataset", d["name"], list_datasets(), dataset_class)
    d["options"] = _checked(d["options"], adapter, "data.options", _DATASET_ARGS)
    if d["augment"]:
        d["augment"] = _checked(d["augment"], BatchAugment, "data.augment", _AUGMENT_ARGS)
    return cfg


def build_dataset(cfg: dict, split_key: str) -> SegmentationDataset:
    """The dataset of ``data.splits[split_key]`` (kept in memory with ``data.cache_in_memory``)."""
    d = cfg["data"]
    root = resolve_root(d["root"])
    try:
        ds = create_dataset(d["name"], d["root"], split=d["splits"][split_key], **(d.get("options") or {}))
    except DatasetError as exc:  # the root itself: missing, a file, unreadable
        if exc.path != str(root):
            raise
        raise ConfigError(f"data.root: {exc.reason} ({root}); expected the folder of the unmodified {d['name']} "
                          f"download; set data.root=<that folder> in the config or with --set") from None
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
    if cfg["model"].get("init_from"):
        # "{seed}": the run of the same seed (repeated runs, :mod:`.repeats`)
        path = str(cfg["model"]["init_from"]).replace("{seed}", str(int(cfg["seed"])))
        init_from_checkpoint(run.model, path, cfg["model"].get("init_prefixes") or ())
    val = build_dataset(cfg, "val") if cfg["train"]["val_every"] and cfg["data"]["splits"].get("val") else None
    return Trainer(cfg, model=run.model, method=run.method, train_set=run.dataset, val_set=val, **kwargs)


def init_from_checkpoint(model: nn.Module, path, prefixes: Iterable[str] = ()) -> list[str]:
    """Copy into ``model`` the weights of the checkpoint at ``path`` whose names start with one of
    ``prefixes`` (none given: every weight of ``model``), e.g. PU-Net's second phase taking
    the encoder of the first. Every selected weight must be in the checkpoint with the same
    shape (else :class:`~mtseg_harness.config.ConfigError`); the others keep their
    initialisation. A resumed run then overwrites all of it with its own checkpoint.
    Returns the names copied."""
    state = load_checkpoint(path, required=("model",))["model"]
    own = model.state_dict()
    prefixes = tuple(prefixes)
    names = [k for k in own if not prefixes or k.startswith(prefixes)]
    if not names:
        raise ConfigError(f"model.init_prefixes={list(prefixes)}: no weight of model {type(model).__name__} starts "
                          f"with these; {FIX}")
    missing = [k for k in names if k not in state]
    wrong = [k for k in names if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        what = "; ".join(x for x in (
            f"missing there: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"other shape: {', '.join(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in wrong[:4])}"
            if wrong else "") if x)
        raise ConfigError(f"model.init_from={path}: the checkpoint does not hold this model's weights ({what}); "
                          f"give a checkpoint of the same network, or narrow model.init_prefixes")
    model.load_state_dict({k: state[k] for k in names}, strict=False)
    return names
