"""The schema of a config: every section, its keys, their types, ranges and defaults.

Validation is pydantic's (v2): each section is a model that forbids unknown keys, and
the fields carry the type and range. We chose pydantic over OmegaConf structured
configs because a config needs range checks (``batch_size >= 1``), literal choices
(``optim.name``), unions (``train.amp``: a bool or a precision name) and validation of
keyword options against a dataclass or a function signature; OmegaConf 2.x checks types
on assignment but has none of those, so they would have stayed hand-written. The
merging (``base:`` files, ``--set`` overrides) stays ours: it is a few lines of dict
merging and keeps the YAML reading we had.

What a failed check says is built here too (:func:`format_errors`): one clause per bad
key -- the dotted key, what was expected, what was given, the nearest valid key for a
typo -- and what to do.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, TypeAdapter, ValidationError, create_model, model_validator)

__all__ = ["Config", "check_options", "format_errors", "keyword_fields", "nearest", "plain", "validate"]


def _lower(v):
    return v.lower() if isinstance(v, str) else v


#: keyword options: a mapping, ``null`` meaning none
Options = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]


# Names compared case-insensitively (``optim.name: Adam`` is ``adam``), as the trainer reads them.
def _choice(*names):
    return Annotated[Literal[names], BeforeValidator(_lower)]


def _device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", v):
        raise ValueError("expected auto, cpu, cuda, cuda:N, mps, xpu or xpu:N")
    return v


#: ``auto`` or a torch device string; whether the device is there is checked when the run starts.
Device = Annotated[str, AfterValidator(_device)]


class Section(BaseModel):
    # numbers given as YAML strings still parse ("1e-3"); ints as strings (out_dir: 2024) too
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                              validate_default=True)


class Splits(Section):
    """Which split of the dataset each role reads (``all`` = every sample; ``null`` = none)."""

    train: Optional[str] = "train"
    val: Optional[str] = "val"
    test: Optional[str] = "test"


class Data(Section):
    name: str = "hc18"
    root: str = "builtin:hc18_sample"
    #: keyword arguments of the dataset adapter (checked against its signature by the runs layer)
    options: Options = {}
    splits: Splits = Splits()
    batch_size: PositiveInt = 8
    eval_batch_size: Optional[PositiveInt] = 8
    #: ``auto``: from the CPUs this process may use (see ``training.data.default_num_workers``)
    num_workers: Union[NonNegativeInt, Literal["auto"]] = "auto"
    #: keyword arguments of ``BatchAugment`` (checked against its signature by the runs layer); null = off
    augment: Optional[dict[str, Any]] = {"flip_prob": 0.5}
    #: train on images resized to [H, W]; evaluation resizes the logits back
    input_size: Optional[Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]] = None
    cache_in_memory: bool = False


class Model(Section):
    name: str = "unet"
    #: keyword arguments of the architecture (checked against its builder's signature by the runs layer)
    options: Options = {}
    #: heads laid over the method's, e.g. ``{presence: {hidden: 128}}``
    heads: Optional[dict[str, Any]] = None
    #: a checkpoint whose weights start training (e.g. a pre-trained encoder; ``{seed}``: this run's seed);
    #: null = random init
    init_from: Optional[Annotated[str, Field(min_length=1)]] = None
    #: which of ``init_from``'s weights: names starting with one of these (``encoder.``); [] = all the model has
    init_prefixes: list[Annotated[str, Field(min_length=1)]] = []


class Method(BaseModel):
    """``name`` + the method's options, checked against the method's option dataclass by the runs layer."""

    model_config = ConfigDict(extra="allow")
    name: str = "baseline"


class Optim(Section):
    name: _choice("adam", "adamw", "sgd") = "adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False


class Sched(Section):
    name: _choice("none", "constant", "step", "multistep", "piecewise", "cosine_restarts",
                  "cosine_warm_restarts") = "none"
    step_size: PositiveInt = 1000
    gamma: PositiveFloat = 0.1
    milestones: list[NonNegativeInt] = []
    #: piecewise: the learning rate from each of ``milestones`` on (optim.lr before the first)
    lr_values: list[PositiveFloat] = []
    T_0: PositiveInt = 1000
    T_mult: PositiveInt = 1
    eta_min: NonNegativeFloat = 0.0
    #: what ``step_size``, ``milestones`` and ``T_0`` count: optimiser steps, or epochs
    #: (passes over the training set, converted to steps by the trainer)
    interval: _choice("step", "epoch") = "step"

    @model_validator(mode="after")
    def _piecewise(self):
        if self.name == "piecewise":
            if not self.milestones or len(self.lr_values) != len(self.milestones):
                raise ValueError(f"piecewise needs one lr_values entry per milestone and at least one; got "
                                 f"milestones {self.milestones}, lr_values {self.lr_values}")
            if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
                raise ValueError(f"piecewise milestones must increase, got {self.milestones}")
        return self


class Train(Section):
    steps: PositiveInt = 1000
    #: train for this many epochs instead of ``steps`` (an epoch: every training image once,
    #: ``len(train set) // global batch`` steps); null = ``steps`` counts
    epochs: Optional[PositiveInt] = None
    #: every N steps, or ``epoch`` (at the end of every epoch); 0 or null = never
    val_every: Union[NonNegativeInt, Literal["epoch"], None] = 200
    log_every: Optional[NonNegativeInt] = 10
    #: every N steps, or ``epoch``; 0 or null = never
    checkpoint_every: Union[NonNegativeInt, Literal["epoch"], None] = 200
    #: max gradient norm; 0 or null = no clipping
    grad_clip: Optional[NonNegativeFloat] = None
    #: auto: bf16 (fp16 without bf16) on CUDA, off on the CPU
    amp: _choice(True, False, "auto", "off", "none", "on", "true", "false", "bf16", "bfloat16", "fp16",
                 "float16") = "auto"
    out_dir: Annotated[str, Field(min_length=1)] = "runs/default"
    #: true/auto: continue from <out_dir>/last.pt when it exists; a path: from that checkpoint
    resume: Union[bool, Annotated[str, Field(min_length=1)]] = False
    progress: bool = True
    sync_bn: bool = True
    tensorboard: bool = True
    threads: Optional[PositiveInt] = None
    val_max_batches: Optional[PositiveInt] = None
    #: validation mean that keeps ``best.pt`` (higher is better): ``dice_fg`` (mean foreground
    #: Dice per image) or ``miou`` (dataset-level mean IoU over every class, background included)
    select_metric: _choice("dice_fg", "miou") = "dice_fg"


class PaperResult(Section):
    """The paper's numbers for the results-table row a config reproduces; ``mtseg eval``
    prints them beside the run's (``values``: ``null`` where the paper's number is not
    known to us, which is then printed as such)."""

    #: where the numbers are (paper, table, row)
    source: Annotated[str, Field(min_length=1)]
    #: the summary mean compared (e.g. ``miou``)
    metric: Annotated[str, Field(min_length=1)] = "miou"
    #: a per-group report of the dataset (e.g. ``video``): one number per group; ``null``: the whole split
    group: Optional[str] = None
    #: group value (``all`` for the whole split) -> the paper's number
    values: dict[str, Optional[float]] = {}


class Eval(Section):
    #: the paper's numbers for this config's results-table row (printed beside ours)
    paper: Optional[PaperResult] = None
    split: _choice("train", "val", "test") = "test"
    hd: bool = True
    #: examples drawn in overlays.png
    overlays: NonNegativeInt = 4
    #: <train.out_dir>/<checkpoint>.pt (best, last, ...)
    checkpoint: Annotated[str, Field(min_length=1)] = "best"
    pad_multiple: PositiveInt = 32
    #: sliding-window inference: the window's spatial size (e.g. the training crop), null = whole input at once
    window: Optional[Annotated[list[PositiveInt], Field(min_length=2, max_length=3)]] = None
    #: fraction of a window shared with the next along each axis
    window_overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5


class Config(Section):
    seed: NonNegativeInt = 0
    deterministic: bool = False
    device: Device = "auto"
    data: Data = Data()
    model: Model = Model()
    method: Method = Method()
    optim: Optim = Optim()
    sched: Sched = Sched()
    train: Train = Train()
    eval: Eval = Eval()


# --------------------------------------------------------------------------- validation


def nearest(key: str, known) -> Optional[str]:
    """The known key closest to ``key`` (a typo, another case, a missing underscore), or ``None``."""
    known = [str(k) for k in known]
    squash = {k.lower().replace("_", ""): k for k in known}
    if key.lower().replace("_", "") in squash:
        return squash[key.lower().replace("_", "")]
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _key_of(model, loc) -> tuple[tuple, Optional[type[BaseModel]]]:
    """The config key in a pydantic error location (union-member tags dropped, list indices
    kept) and the section model that holds its last part."""
    key, holder, current = [], None, model
    for part in loc:
        if isinstance(part, int):
            key.append(part)
            current = None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            holder = current
            key.append(part)
            field = current.model_fields.get(part)
            ann = field.annotation if field is not None else None
            current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        # else: a tag such as 'int' or "literal['auto']" naming the member of a union
    return tuple(key), holder


def _dotted(prefix: str, key) -> str:
    text = prefix
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected(err: dict) -> str:
    """A pydantic error as what was expected: 'Input should be > 0' -> 'expected > 0'."""
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} items"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} items"
    if kind == "missing":
        return "expected a value (required)"
    for lead in ("Value error, ", "Assertion failed, "):
        msg = msg[len(lead):] if msg.startswith(lead) else msg
    msg = msg[0].lower() + msg[1:]
    if msg.startswith("input should be"):
        return "expected" + msg[len("input should be"):]
    return msg if msg.startswith("expected") else f"expected a valid value ({msg})"


def format_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "", limit: int = 6) -> str:
    """One line for a pydantic error of ``model``: a clause per bad key (at most ``limit``):
    the dotted key, what was expected, what was given, the nearest valid key of a typo."""
    order, problems = [], {}
    for err in exc.errors():
        key, holder = _key_of(model, err["loc"])
        if key not in problems:
            order.append(key)
            problems[key] = {"errors": [], "holder": holder}
        problems[key]["errors"].append(err)
    clauses = []
    for key in order:
        errs, holder = problems[key]["errors"], problems[key]["holder"]
        dotted = _dotted(prefix, key)
        if any(e["type"] == "extra_forbidden" for e in errs):
            names = sorted(holder.model_fields) if holder is not None else []
            what = "unknown config section" if not prefix and len(key) == 1 else "unknown key"
            guess = nearest(str(key[-1]), names)
            hint = f" (did you mean {_dotted(prefix, key[:-1] + (guess,))}?)" if guess else ""
            clauses.append(f"{what} {dotted!r}{hint}; valid here: {', '.join(names)}")
            continue
        # a union reports once per member: 'expected >= 0 or 'auto''
        wanted = list(dict.fromkeys(_expected(e) for e in errs))
        wanted = [wanted[0]] + [w[len("expected "):] if w.startswith("expected ") else w for w in wanted[1:]]
        clauses.append(f"{dotted}: {' or '.join(wanted)}; given {_short(errs[0].get('input'))}")
    more = f"; and {len(clauses) - limit} more" if len(clauses) > limit else ""
    return "; ".join(clauses[:limit]) + more


def validate(cfg: Mapping) -> dict:
    """A complete config (defaults merged in) checked against :class:`Config`; plain dicts and lists.

    Raises ``ValueError`` with one line naming every bad key (:func:`format_errors`).
    """
    try:
        return Config.model_validate(cfg).model_dump()
    except ValidationError as exc:
        raise ValueError(format_errors(exc, Config)) from None


# --------------------------------------------------------------------------- keyword options


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # an annotation that does not resolve: check names only
        return {}


def _inits(cls) -> list:
    """The ``__init__`` of ``cls`` and of each base that defines one, nearest first."""
    return [c.__init__ for c in inspect.getmro(cls) if "__init__" in vars(c)]


def keyword_fields(target, skip=()) -> dict[str, tuple[Any, Any]]:
    """``name -> (annotation, default)`` of the keyword options ``target`` accepts.

    ``target``: a dataclass (its fields), a class (its ``__init__``, following ``**kwargs``
    up the MRO) or a function (following ``**kwargs`` to the class its return annotation
    names, e.g. ``def unet(..., **kwargs) -> UNet``). ``skip``: names the caller passes
    itself (``in_channels``, ``root``, ...). Unresolvable annotations become ``Any``.
    """
    fields: dict[str, tuple[Any, Any]] = {}
    if dataclasses.is_dataclass(target):
        hints = _hints(target)
        for f in dataclasses.fields(target):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
            fields[f.name] = (hints.get(f.name, Any), default)
        return {k: v for k, v in fields.items() if k not in skip}

    # a class: its __init__ and, while they pass **kwargs on, its bases'; a function: itself,
    # then (when it passes **kwargs on) the class it returns
    chain = _inits(target) if inspect.isclass(target) else [target]
    followed_return = inspect.isclass(target)
    while chain:
        fn = chain.pop(0)
        if fn is object.__init__:
            break
        hints = _hints(fn)
        forwards = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "cls"):
                default = p.default if p.default is not p.empty else ...
                fields.setdefault(p.name, (hints.get(p.name, Any), default))
        if not forwards:
            break
        if not followed_return:
            followed_return = True
            ret = hints.get("return")
            if inspect.isclass(ret):
                chain = _inits(ret)
                continue
        if not chain:  # **kwargs that go where we cannot see: any name passes
            fields["**"] = (Any, None)
    return {k: v for k, v in fields.items() if k not in skip}


def _eager(annotation):
    """``Iterable[X]`` as ``list[X]`` (inside unions too): pydantic checks an iterable lazily,
    when it is consumed, which would be after the check and not as a YAML value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (collections.abc.Iterable, collections.abc.Iterator):
        return list[args[0]] if args else list
    if origin in (Union, types.UnionType):
        return Union[tuple(_eager(a) for a in args)]
    return annotation


def _field_type(annotation):
    """The annotation if pydantic can build a validator for it, else ``Any``."""
    annotation = _eager(annotation)
    try:
        TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
        return annotation
    except Exception:
        try:
            TypeAdapter(annotation)
            return annotation
        except Exception:
            return Any


def plain(x):
    """``x`` as YAML-safe values: mappings -> dicts, tuples -> lists, paths -> str, dataclasses -> dicts."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return plain(dataclasses.asdict(x))
    if hasattr(x, "__fspath__"):
        return str(x)
    return x


def check_options(options: Mapping, fields: Mapping[str, tuple[Any, Any]], where: str) -> dict:
    """``options`` checked against ``fields`` (:func:`keyword_fields`): unknown names (with the
    nearest valid one), types and ranges. Returns the given options only (defaults are the
    target's business), as plain YAML types.

    ``where``: the dotted config key of the options (``model.options``), named in errors.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: expected a mapping of option names to values, got {_short(options)}")
    open_ended = "**" in fields
    fields = {k: v for k, v in fields.items() if k != "**"}
    unknown = [k for k in options if k not in fields]
    if unknown and not open_ended:
        clauses = []
        for k in unknown:
            guess = nearest(str(k), fields)
            hint = f" (did you mean {where}.{guess}?)" if guess else ""
            clauses.append(f"unknown key '{where}.{k}'{hint}")
        raise ValueError("; ".join(clauses) + f"; valid here: {', '.join(sorted(fields)) or '(none)'}")
    given = {k: v for k, v in options.items() if k in fields}
    spec = {k: (_field_type(fields[k][0]), ...) for k in given}
    model = create_model("Options", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                                          allow_inf_nan=False), **spec)
    try:
        checked = model.model_validate(given)
    except ValidationError as exc:
        raise ValueError(format_errors(exc, model, where)) from None
    return {**{k: v for k, v in options.items() if k not in fields}, **{k: plain(getattr(checked, k)) for k in given}}
