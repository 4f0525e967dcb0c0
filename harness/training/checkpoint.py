"""Checkpoints: tensors and plain types only, a checksum of the payload, atomic writes.

A checkpoint is one mapping written with ``torch.save`` that plain PyTorch reads with
``torch.load(path, weights_only=True)``: it holds tensors, ``dict``/``list``/``tuple``,
``str``/``int``/``float``/``bool``/``None`` and nothing else (RNG states are tensors), so
loading it never runs code from the file. Its entries::

    format     "mtseg-checkpoint/1"
    checksum   "sha256:<hex>" over every other entry (keys, values, tensor dtypes, shapes, bytes)
    model      the model's state dict (model.load_state_dict(state["model"]))
    ...        what the writer adds; the trainer: TRAINER_KEYS (optimizer, scheduler, scaler, step,
               best, best_step, method, rng, config, world_size)

Writing (:func:`save_checkpoint`, :func:`save_atomic`): a temporary ``.<name>.<random>.tmp``
in the same folder, created with the mode the umask gives any new file, fsync'd, renamed over
the target (``os.replace``: atomic within one file system) and the folder fsync'd. A crash,
``kill -9`` or a full disk mid-write leaves the previous file intact; the temporary file a
killed write leaves behind is removed by :func:`remove_partial_writes` (the trainer calls it
when it starts).

Reading (:func:`load_checkpoint`, :func:`model_weights`) turns every problem into one
:class:`CheckpointError` line naming the file and the problem: missing, empty, not a
PyTorch file (truncated, random bytes), Python objects other than tensors and plain
types, a checksum that does not match (a changed byte), missing entries, NaN/Inf weights.

Cost (measured, default UNet + Adam state, 373 MB, one thread, loaded 2-core machine):
the checksum and the NaN/Inf check take about as long as the write or the read itself
(save 1.4 s plain -> 2.6 s checked, load 1.2 s -> 2.6 s).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import secrets
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

FORMAT = "mtseg-checkpoint/1"
#: What :meth:`mtseg_harness.training.Trainer.state_dict` writes besides ``format`` and ``checksum``.
TRAINER_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "best", "best_step", "method", "rng", "config",
                "world_size")
#: The files the trainer writes; their partial writes are ``.<name>.*.tmp``.
CHECKPOINT_NAMES = ("last.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


# ---------------------------------------------------------------------------------- payload
_PLAIN = (str, int, float, bool, type(None))


def _feed(h, x, where: str) -> None:
    """Hash ``x`` into ``h``: type tags, lengths and values, so that no two payloads share a stream.

    Raises ``TypeError`` naming ``where`` for anything but tensors and plain types.
    """
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_quantized:
            raise TypeError(f"{where}: only dense tensors go into a checkpoint, got a {x.layout} tensor")
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the tensor's memory itself, no copy
    elif type(x) in (dict, OrderedDict):
        h.update(f"D{len(x)}:".encode())
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _feed(h, k, where)
            _feed(h, v, f"{where}.{k}")
    elif type(x) in (list, tuple):
        h.update(f"{'L' if type(x) is list else 'U'}{len(x)}:".encode())
        for i, v in enumerate(x):
            _feed(h, v, f"{where}[{i}]")
    elif type(x) in _PLAIN:
        text = repr(x)
        h.update(f"{type(x).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"{where}: a checkpoint holds tensors and plain types only, got {type(x).__module__}."
                        f"{type(x).__qualname__}")


def payload_checksum(state: Mapping) -> str:
    """``sha256:<hex>`` of every entry of ``state`` but ``checksum`` (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"}, "checkpoint")
    return "sha256:" + h.hexdigest()


def plain(x):
    """``x`` with every mapping a ``dict``, every sequence a ``list`` (e.g. a config for a checkpoint)."""
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [plain(v) for v in x]
    return x


def _finite(t: torch.Tensor) -> bool:
    if not t.numel():
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t.detach())  # one pass, no mask tensor; NaN propagates, Inf shows as an extreme
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _nonfinite(tensors: Mapping, what: str) -> str | None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not _finite(t):
            bad = int((~torch.isfinite(t)).sum())
            return f"{what} {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}"
    return None


def nonfinite_weights(state: Mapping) -> str | None:
    """Which model weight of ``state`` holds NaN/Inf values (and how many), or ``None``."""
    model = state.get("model")
    return _nonfinite(model, "model weight") if isinstance(model, Mapping) else None


# ---------------------------------------------------------------------------------- writing
def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` in ``exc``'s chain of causes, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def save_atomic(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: the old file stays whole until the new one is complete.

    The new file gets the mode the umask gives (``0o666 & ~umask``), as ``open(path, "wb")`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open applies the umask to 0o666 (mkstemp would force 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = _os_error(exc)
        if cause is not None:  # torch.save reports a failed write (full disk) as a RuntimeError
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}; "
                                       f"the file there is kept") from exc
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: Mapping, path) -> Path:
    """Write ``state`` (tensors and plain types; ``model`` a state dict) as a checkpoint at ``path``.

    Adds ``format`` and ``checksum``. Raises ``TypeError`` naming the entry that is not a
    tensor or plain type, and :class:`CheckpointError` (keeping the old file) when a model
    weight is NaN/Inf: a diverged run never overwrites a good checkpoint.
    """
    path = Path(path)
    bad = nonfinite_weights(state)
    if bad:
        raise CheckpointError(f"not writing checkpoint {path}: {bad}; the file there is kept")
    out = {"format": FORMAT, **{k: v for k, v in state.items() if k not in ("format", "checksum")}}
    out["checksum"] = payload_checksum(out)
    return save_atomic(out, path)


def remove_partial_writes(folder, names: Iterable[str] = CHECKPOINT_NAMES) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted :func:`save_atomic` left in ``folder``; returns them."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for name in names:
            for tmp in sorted(folder.glob(f".{name}.*.tmp")):
                try:
                    tmp.unlink()
                    removed.append(tmp)
                except OSError:
                    pass
    return removed


# ---------------------------------------------------------------------------------- reading
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(exc).__name__


def _python_objects(path: Path) -> list[str]:
    """The classes/functions a PyTorch zip file's pickle names beyond what ``weights_only`` allows
    (read from its opcodes, nothing run); ``[]`` for files that are not PyTorch zip files."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def _read(path: Path):
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one :class:`CheckpointError` line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found" if not path.exists()
                              else f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was cut off; "
                              f"use another checkpoint or train anew")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(exc)}") from exc
    try:
        with f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        objects = _python_objects(path)
        if objects:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain types ({', '.join(objects[:3])}"
                f"{', ...' if len(objects) > 3 else ''}; written by an older mtseg, or not by mtseg): refusing to "
                f"unpickle it; train anew, or, if you trust the file, convert it with "
                f"torch.load(path, weights_only=False)") from exc
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is not a PyTorch checkpoint, or is corrupted "
                              f"(unpickling failed)") from exc
    except Exception as exc:  # untrusted bytes: zip, pickle and storage errors all mean a damaged file
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is truncated or corrupted: "
                              f"{_one_line(exc)}") from exc


def _verify(state, path: Path, required: Iterable[str]) -> dict:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint mapping")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mtseg checkpoint (format {state.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if "checksum" not in state:
        raise CheckpointError(f"checkpoint {path} has no checksum entry: cannot tell whether it is intact")
    try:
        actual = payload_checksum(state)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    if actual != state["checksum"]:
        raise CheckpointError(f"checkpoint {path} is damaged: the checksum of its contents does not match the "
                              f"one stored when it was written (a changed byte?); use another checkpoint")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a complete checkpoint of this kind")
    bad = nonfinite_weights(state)
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad}; the run had diverged when it was saved: "
                              f"use an earlier checkpoint or train anew")
    return dict(state)


def load_checkpoint(path, required: Iterable[str] = ("model",)) -> dict:
    """The verified contents of the checkpoint at ``path`` (tensors on the CPU).

    Read with ``weights_only=True``; the checksum, the ``required`` entries and the
    finiteness of the model weights are checked. Every problem raises one
    :class:`CheckpointError` line naming the file.
    """
    path = Path(path)
    return _verify(_read(path), path, required)


def model_weights(path_or_state) -> dict:
    """The model's state dict from a checkpoint file (verified) or from a loaded checkpoint mapping.

    ``model.load_state_dict(model_weights("runs/x/best.pt"))``. A file holding a bare state
    dict (``torch.save(model.state_dict(), path)``: names -> tensors) is accepted too; it has
    no checksum, only its NaN/Inf check. Plain PyTorch reads the same weights with
    ``torch.load(path, weights_only=True)["model"]``.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = Path(path_or_state)
        state = _read(path)
        if isinstance(state, Mapping) and state and "format" not in state \
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            bad = _nonfinite(state, "weight")
            if bad:
                raise CheckpointError(f"state dict {path}: {bad}")
            return dict(state)
        return _verify(state, path, ("model",))["model"]
    state = path_or_state
    return state["model"] if isinstance(state, Mapping) and "model" in state else state


def load_model_state(model: torch.nn.Module, weights: Mapping, source) -> None:
    """``model.load_state_dict(weights)``, or one :class:`CheckpointError` line saying what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: {list(weights[k].shape)} in the checkpoint, {list(own[k].shape)} here"
              for k in own if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} weight(s) of another shape (e.g. {shapes[0]})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in this model (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {source} was trained with another model than the one built here: "
                              + "; ".join(parts))
    model.load_state_dict(weights)


# ---------------------------------------------------------------------------------- RNG states
def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG the trainer draws from, as tensors and plain types: python's ``random``,
    numpy's global generator, torch's (and CUDA's), and ``generator`` (augmentation) if given."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        state["augment"] = generator.get_state()
    return state


def set_rng_state(state: Mapping, generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["bit_generator"], nps["key"].numpy().astype(np.uint32), int(nps["pos"]),
                         int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "augment" in state:
        generator.set_state(state["augment"].cpu())


def scheduler_state(scheduler) -> dict:
    """The LR scheduler's state dict in plain types (``MultiStepLR`` keeps its milestones in a ``Counter``)."""
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in scheduler.state_dict().items()}


def load_scheduler_state(scheduler, state: Mapping) -> None:
    own = vars(scheduler)
    scheduler.load_state_dict({k: Counter(v) if isinstance(own.get(k), Counter) and isinstance(v, Mapping) else v
                               for k, v in state.items()})


# ---------------------------------------------------------------------------------- configs
def flat(cfg: Mapping, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` for a nested mapping (lists are values)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):  # (an empty mapping adds no key: {} and absent read the same)
            out.update(flat(v, key + "."))
        else:
            out[key] = plain(v)
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def config_changes(saved: Mapping, current: Mapping, *, keys: Iterable[str] | None = None,
                   ignore: Iterable[str] = ()) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every dotted key where the configs differ.

    ``keys``: only these keys and the keys below them; ``ignore``: leave these (and below) out.
    A value absent on one side is ``"<absent>"``.
    """
    a, b = flat(saved), flat(current)

    def under(key, roots):
        return any(key == r or key.startswith(r + ".") for r in roots)

    keys = None if keys is None else list(keys)
    ignore = list(ignore)
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        if (keys is not None and not under(k, keys)) or under(k, ignore):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if not _same(va, vb):
            out.append((k, va, vb))
    return out


def describe_changes(changes, limit: int = 6) -> str:
    """``optim.lr 0.001 -> 0.002, model.options.base_channels 4 -> 8`` (at most ``limit``, then a count)."""

    def short(v):
        text = repr(v) if isinstance(v, str) and v != "<absent>" else str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} {short(a)} -> {short(b)}" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)
