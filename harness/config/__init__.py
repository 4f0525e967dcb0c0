"""YAML experiment configs with dotted command-line overrides.

A config is a nested mapping with the sections below; a file may start from other
files with ``base: other.yaml`` (or a list; paths relative to the file), deep-merged
in order, the file's own keys last (no cycles; at most 32 files nested). Overrides ``a.b.c=value`` (value parsed as YAML:
``optim.lr=1e-3``, ``train.amp=false``, ``data.augment.crop=[128,128]``) apply on top.
The final config is ``DEFAULTS`` <- presets (the method's paper defaults,
``Method.config_defaults``, e.g. HOG-MTL's Adam 2e-4 halved every 50k of 150k steps)
<- the file <- the overrides, checked against the schema (:mod:`.schema`: every key of
every section, its type and range; a typo names the nearest valid key). The result is
plain dicts and lists, the same after a round trip through :func:`dump`.

This package knows the sections and their defaults, nothing of methods, models or data:
:func:`mtseg_harness.runs.load_config` is the one function that loads a config; it
passes the method's presets to :func:`resolve` and checks the keyword options (method,
model, dataset, augmentation) with :func:`check_options` against what they configure.

Sections (types, ranges and defaults: :class:`.schema.Config`)::

    seed, deterministic, device         run-wide
    data:   name, root, options, splits, batch_size, eval_batch_size, num_workers (auto: from the
            CPUs available), augment, input_size (train on images resized to [H, W]; evaluation
            resizes the logits back), cache_in_memory (keep decoded samples: small data sets)
    model:  name, options (architecture keyword arguments), heads (laid over the method's),
            init_from + init_prefixes (start from some weights of a checkpoint)
    method: name, + the method's options (its ``Options`` dataclass, see mtseg_harness.methods)
    optim:  name (adam|adamw|sgd), lr, weight_decay, betas, momentum, nesterov
    sched:  name (none|step|multistep|cosine_restarts), step_size, gamma, milestones, T_0, T_mult, eta_min,
            interval (step|epoch: what step_size, milestones and T_0 count)
    train:  steps or epochs, val_every (N steps or epoch), log_every, checkpoint_every, grad_clip, amp, out_dir, resume, progress,
            sync_bn, tensorboard, threads, val_max_batches
    eval:   split, hd (surface metrics on/off), overlays, checkpoint, pad_multiple

``data.root: builtin:hc18_sample`` is the HC18 sample shipped with the package.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .schema import Config, check_options, keyword_fields, nearest, plain, validate

__all__ = ["DEFAULTS", "FIX", "SECTIONS", "ConfigError", "apply_overrides", "check_options", "deep_merge", "dump",
           "keyword_fields", "method_name", "nearest", "parse_override", "plain", "read_config", "read_yaml", "resolve",
           "validate", "yaml_load"]

#: Every section with its defaults (the schema's, :class:`.schema.Config`).
DEFAULTS: dict[str, Any] = Config().model_dump()

SECTIONS = set(DEFAULTS)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)



class ConfigError(ValueError):
    """A config that cannot run: the message names the key, what was expected and what was given."""


#: What to do about a bad key or value (the end of a :class:`ConfigError` message).
FIX = "fix it in the config file or with --set KEY=VALUE"


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """A copy of ``base`` with ``update`` merged in (mappings recursively, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value as YAML ({exc})") from None
    return key.split("."), parsed


def apply_overrides(cfg: Mapping, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return out


#: the most files one ``base:`` chain may hold (a config and its bases, nested)
MAX_BASE_DEPTH = 32


def read_yaml(path, _chain: tuple = ()) -> dict:
    """The mapping in ``path`` with its ``base:`` files merged under it (``_chain``: the files
    that include this one, to refuse a cycle and a chain longer than :data:`MAX_BASE_DEPTH`)."""
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in _chain[_chain.index(here):] + (here,))
        raise ConfigError(f"config {path}: its base: files include it again ({cycle}); remove that base: entry")
    if len(_chain) >= MAX_BASE_DEPTH:
        chain = " -> ".join(p.name for p in _chain + (here,))
        raise ConfigError(f"config {_chain[0]}: its base: chain is longer than {MAX_BASE_DEPTH} files ({chain}); "
                          "merge some of those files")
    try:
        data = yaml_load(path.read_text())
    except OSError as exc:
        via = f" (a base: of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"cannot read config {path}{via}: {exc.strerror or exc}; check the path") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
            raise ConfigError(f"config {path}: base: must be a file name or a list of them, got {bases!r}")
        merged: dict = {}
        for b in bases:
            merged = deep_merge(merged, read_yaml(path.parent / b, _chain + (here,)))
        data = deep_merge(merged, data)
    return data


def resolve(user: Mapping, presets: Iterable[Mapping] = ()) -> dict:
    """``DEFAULTS`` <- each of ``presets`` <- ``user``, checked against the schema
    (:mod:`.schema`): every key of every section, types and ranges. Keyword options
    (``method``, ``model.options``, ``data.options``, ``data.augment``) are checked by the
    runs layer, which knows what they are for (:func:`check_options`).

    Returns plain dicts and lists (YAML-safe); raises :class:`ConfigError`.
    """
    if not isinstance(user, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(user).__name__}")
    cfg = dict(DEFAULTS)
    for preset in presets:
        cfg = deep_merge(cfg, preset)
    cfg = deep_merge(cfg, user)
    try:
        return validate(cfg)
    except ValueError as exc:
        raise ConfigError(f"{exc}; {FIX}") from None


def read_config(path=None, overrides: Iterable[str] = (), base: Mapping | None = None) -> dict:
    """The user's part of a config: ``base`` <- the file at ``path`` (with its ``base:`` files) <- ``overrides``."""
    user = read_yaml(path) if path is not None else {}
    if base is not None:
        user = deep_merge(base, user)
    return apply_overrides(user, overrides)


def method_name(user: Mapping) -> str:
    """The method a user config asks for (the default one when it names none)."""
    method = user.get("method")
    return method.get("name", DEFAULTS["method"]["name"]) if isinstance(method, Mapping) else DEFAULTS["method"]["name"]


def dump(cfg: Mapping) -> str:
    """``cfg`` as YAML (what ``mtseg config`` prints and a run folder's config.yaml holds)."""
    return yaml.safe_dump(plain(cfg), sort_keys=False)
