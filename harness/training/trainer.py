"""The one trainer every method runs on.

:class:`Trainer` takes a resolved config (:mod:`mtseg_harness.config`) and the pieces
built from it (training set, method, model with the method's heads, validation set:
:func:`mtseg_harness.runs.build_trainer` assembles them, seeded) and builds the optimiser
and the LR schedule. Per step: a global batch (see
:mod:`.data`), to the device, seeded augmentation (:class:`~mtseg_harness.data.BatchAugment`),
the method's auxiliary labels on the device, forward under autocast, the method's loss,
backward (with a GradScaler for float16), gradient clipping, optimiser and scheduler
step, then the method's hook (e.g. label updates), logging, validation every
``train.val_every`` steps (best-on-validation checkpoint ``best.pt``) and ``last.pt``
every ``train.checkpoint_every`` steps, both written atomically.

Resuming (``train.resume: true``: ``<out_dir>/last.pt`` when it exists; or a checkpoint's
path) restores model, optimiser, scheduler, scaler, step, best score, the method's state
and every RNG (python, numpy, torch, CUDA, the augmentation generator); the data order is
a function of the step, so a resumed run continues with exactly the batches an
uninterrupted one would see. With ``deterministic: true`` on the CPU the result is bitwise
identical. It prints one line (which checkpoint, which step), and refuses, with one
:class:`~mtseg_harness.config.ConfigError` line naming the differing keys, a checkpoint
whose config differs from this one in anything but :data:`RESUME_FREE_KEYS` (the step
budget, and settings that do not change what is trained): the saved ``config.yaml``
always describes what the folder's checkpoints hold. A run that starts at step 0 removes
the checkpoints an earlier run left in ``out_dir``; every start removes the temporary files
of an interrupted checkpoint write. A ``KeyboardInterrupt`` saves ``last.pt`` before it
propagates.
"""

from __future__ import annotations

import bisect
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, dump
from ..data import BatchAugment, collate
from ..data.transforms import LABEL_KEYS
from ..evaluation.evaluate import evaluate, predict_batch, resize_image, summary_line
from ..evaluation.report import plot_rounds
from ..methods import TrainContext
from . import distributed as D
from .checkpoint import (CHECKPOINT_NAMES, TRAINER_KEYS, config_changes, describe_changes, load_checkpoint,
                         load_model_state, load_scheduler_state, plain, remove_partial_writes, rng_state,
                         save_checkpoint, scheduler_state, set_rng_state)
from .data import eval_loader, slice_params, to_device, train_loader
from .logs import CSVLog, TensorBoardLog, progress_bar

#: Config keys a resumed run may change: the step budget, and how the run is started and
#: shown (``data.num_workers`` changes no result: the data order is a function of the step).
RESUME_FREE_KEYS = ("train.steps", "train.epochs", "train.resume", "train.out_dir", "train.progress", "train.tensorboard",
                    "data.num_workers")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``device`` (``auto``: this rank's GPU if there is one, else the CPU);
    a device this machine lacks is a :class:`~mtseg_harness.config.ConfigError`."""
    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU or driver found"
            raise ConfigError(f"device={name}: expected a CUDA GPU, but torch sees none ({why}); "
                              f"set device=cpu (or auto) in the config or with --set")
        if dev.index >= count:
            raise ConfigError(f"device={name}: expected cuda:0 to cuda:{count - 1} ({count} GPU(s) here, "
                              f"rank {local_rank}); set device=cuda or auto")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name}: expected an Apple MPS device, none here; set device=cpu (or auto)")
    return dev


def amp_dtype_for(setting, device: torch.device):
    """``auto``: bf16 (or fp16 without bf16) on CUDA, off on the CPU; ``bf16``/``fp16``/``off``/bool."""
    if setting in (False, None, "off", "none", "false"):
        return None
    if setting in ("auto", True, "true", "on"):
        if device.type != "cuda":
            return torch.bfloat16 if setting is True else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if setting not in table:
        raise ConfigError(f"train.amp: expected auto, off, bf16 or fp16; given {setting!r}")
    if device.type == "cpu" and table[setting] == torch.float16:
        raise ConfigError("train.amp=fp16: expected a CUDA device (float16 autocast), the run is on the CPU; "
                          "set train.amp=bf16 or off")
    return table[setting]


def build_optimizer(params, o: dict) -> torch.optim.Optimizer:
    name = str(o["name"]).lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                               nesterov=bool(o["nesterov"]))
    raise ValueError(f"optim.name must be adam, adamw or sgd; got {o['name']!r}")


def build_scheduler(opt, s: dict, steps_per_epoch: int = 1):
    """Per-iteration LR schedules (torch's): step, multistep, piecewise (given rates),
    cosine_restarts, or none.

    With ``interval: epoch`` the periods (``step_size``, ``milestones``, ``T_0``) are given in
    epochs and multiplied by ``steps_per_epoch`` here: the schedule still moves every step
    (a warm restart every ``T_0`` epochs falls on an epoch boundary)."""
    name = str(s["name"]).lower()
    if str(s.get("interval", "step")).lower() == "epoch":
        k = int(steps_per_epoch)
        if k < 1:
            raise ValueError(f"sched.interval=epoch needs at least one step per epoch, got {steps_per_epoch}")
        s = {**s, "step_size": int(s["step_size"]) * k, "T_0": int(s["T_0"]) * k,
             "milestones": [int(m) * k for m in s["milestones"]]}
    if name in ("none", "constant"):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=int(s["step_size"]), gamma=s["gamma"])
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(m) for m in s["milestones"]], gamma=s["gamma"])
    if name == "piecewise":
        # absolute rates (1e-4 -> 5e-5 -> 2e-5 is no constant gamma), as factors of optim.lr
        base = float(opt.defaults["lr"])
        marks, factors = [int(m) for m in s["milestones"]], [float(v) / base for v in s["lr_values"]]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: ([1.0] + factors)[bisect.bisect_right(marks, step)])
    if name in ("cosine_restarts", "cosine_warm_restarts"):
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=int(s["T_0"]), T_mult=int(s["T_mult"]),
                                                                    eta_min=s["eta_min"])
    raise ValueError(f"sched.name must be none, step, multistep, piecewise or cosine_restarts; got {s['name']!r}")


def _say(text: str) -> None:
    """A one-line notice of the run (stderr, like the progress bar)."""
    print(text, file=sys.stderr, flush=True)


class Trainer:
    """Train ``cfg`` (a resolved config) with the given training set, method and model.

    Args:
        cfg: the resolved config (``optim``, ``sched``, ``train``, ``data`` and ``eval`` are read).
        model: built with ``method.heads()``; moved to the run's device here.
        method: the :class:`~mtseg_harness.methods.Method`.
        train_set: the training set as the method wrapped it; it also gives
            ``num_classes``, ``ignore_index`` and ``class_names``.
        val_set: the validation set, or ``None`` (no validation, no ``best.pt``).
        device: overrides ``cfg["device"]``.
        progress: overrides ``train.progress``.

    The caller seeds the RNGs (:func:`seed_everything`) before building the model, as
    :func:`mtseg_harness.runs.build_trainer` does, so a run is reproducible from its config.
    """

    def __init__(self, cfg: dict, *, model: nn.Module, method, train_set, val_set=None, device=None,
                 progress: bool | None = None):
        self.cfg = cfg
        t = cfg["train"]
        if t.get("threads"):
            torch.set_num_threads(int(t["threads"]))
        dev_name = cfg.get("device", "auto") if device is None else str(device)
        self.rank, self.world, self.local_rank = D.init_distributed(resolve_device(dev_name).type)
        self.device = resolve_device(dev_name, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(t["out_dir"])
        self.train_set = train_set
        # one epoch = the sampler's pass over the training set (the last incomplete global batch dropped)
        self.steps_per_epoch = len(train_set) // (int(cfg["data"]["batch_size"]) * self.world)
        if t.get("epochs") and self.steps_per_epoch < 1:
            raise ConfigError(f"train.epochs: the training set has {len(train_set)} images, fewer than one global "
                              f"batch ({cfg['data']['batch_size']} x {self.world} processes); lower data.batch_size")
        self.total_steps = int(t["epochs"]) * self.steps_per_epoch if t.get("epochs") else int(t["steps"])

        self.num_classes = int(train_set.num_classes)
        self.ignore_index = int(train_set.ignore_index)
        self.class_names = list(train_set.class_names)
        self.method = method
        self.val_set = val_set
        self.model = model.to(self.device)
        self.ddp_model = self.model
        if self.world > 1:
            if t.get("sync_bn", True):  # batch statistics of the global batch, on CUDA and on the CPU (gloo)
                self.model = D.convert_sync_batchnorm(self.model, device_type=self.device.type)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

        self.optimizer = build_optimizer(self.model.parameters(), cfg["optim"])
        self.scheduler = build_scheduler(self.optimizer, cfg["sched"], self.steps_per_epoch)
        self.amp_dtype = amp_dtype_for(t["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        aug = cfg["data"].get("augment") or {}
        self.augment = BatchAugment(seed=int(cfg["seed"]), ignore_index=self.ignore_index, **aug) if aug else None

        self.step = 0
        self.best = -math.inf
        self.best_step = None
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.show_progress = bool(t["progress"]) if progress is None else progress
        self._bar = None  # the progress bar while fit() runs (validation lines go through it)
        self.resumed_from: Path | None = None
        self._claimed = False
        if self.is_main:
            for tmp in remove_partial_writes(self.out_dir):
                _say(f"removed {tmp}, left by an interrupted checkpoint write")
        path = self.resume_path()
        if path is not None:
            self.resume(path)
        self.method.setup(self.context())

    # ------------------------------------------------------------------ what a method may use
    def context(self) -> TrainContext:
        """The trainer as a method's hooks see it (:class:`~mtseg_harness.methods.TrainContext`)."""
        return TrainContext(step=self.step, total_steps=self.total_steps, dataset=self.train_set,
                            batches=self._ordered_batches, predict=self._predict,
                            out_dir=self.out_dir if self.is_main else None, save_table=self._save_table,
                            rank=self.rank, work_dir=self.out_dir)

    def _ordered_batches(self, batch_size: int):
        return torch.utils.data.DataLoader(self.train_set, batch_size=int(batch_size), shuffle=False,
                                           collate_fn=collate)

    @torch.no_grad()
    def _predict(self, image: torch.Tensor, segment) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return predict_batch(self.model, segment, image.to(self.device).float(), None,
                                 int(self.cfg["eval"].get("pad_multiple", 32)), self.amp_dtype,
                                 self.cfg["data"].get("input_size"))
        finally:
            self.model.train(was)

    def _save_table(self, name: str, rows: list[dict], plot: dict | None = None) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(rows)
        table.to_csv(self.out_dir / f"{name}.csv", index=False)
        if plot and len(table) > 1:
            plot_rounds(table, self.out_dir / f"{name}.png", **plot)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint holds (:data:`~.checkpoint.TRAINER_KEYS`): tensors and plain types only."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best": self.best,
            "best_step": self.best_step,
            "method": self.method.state_dict(),
            "rng": rng_state(self.augment.generator if self.augment is not None else None),
            "config": plain(self.cfg),
            "world_size": self.world,
        }

    def save(self, path) -> Path | None:
        if not self.is_main:
            return None
        return save_checkpoint(self.state_dict(), path)

    def resume_path(self) -> Path | None:
        """The checkpoint ``train.resume`` asks for: ``<out_dir>/last.pt`` (``true``/``auto``) when it
        exists, a given path (which must exist), or ``None``."""
        resume = self.cfg["train"].get("resume")
        if not resume:
            return None
        if resume is True or resume == "auto":
            path = self.out_dir / "last.pt"
            return path if path.exists() else None
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"train.resume={resume}: no checkpoint there; give an existing checkpoint, "
                              f"true (resume {self.out_dir / 'last.pt'} when it exists) or false")
        return path

    def resume(self, path) -> None:
        """Continue from the checkpoint at ``path``: checked, compared with this config, restored; says so."""
        path = Path(path)
        state = load_checkpoint(path, required=TRAINER_KEYS)
        saved = state["config"]
        changes = config_changes(saved, plain(self.cfg), ignore=RESUME_FREE_KEYS)
        start_anew = "a new train.out_dir, or train.resume=false (replaces that run's checkpoints)"
        if changes:
            raise ConfigError(f"cannot resume {path}: it was trained with another config "
                              f"({describe_changes(changes)}); to train this config, start anew: {start_anew}")
        step = int(state["step"])
        if step > self.total_steps:
            raise ConfigError(f"cannot resume {path}: it is at step {step}, past train.steps={self.total_steps}; "
                              f"set train.steps to {step} or more to continue it, or start anew: {start_anew}")
        self.load_state(state, path)
        self.resumed_from = path
        if self.is_main:
            notes = []
            old_steps = (saved.get("train") or {}).get("steps")
            if old_steps != self.total_steps:
                notes.append(f"step budget {old_steps} -> {self.total_steps}")
            if int(state["world_size"]) != self.world:
                notes.append(f"trained so far by {state['world_size']} process(es), now {self.world}: "
                             f"the global batch changes")
            _say(f"resuming {path} at step {self.step} of {self.total_steps}"
                 + (f" ({'; '.join(notes)})" if notes else ""))

    def load_state(self, state: dict, source="checkpoint") -> None:
        """Restore a :meth:`state_dict` (as :func:`~.checkpoint.load_checkpoint` returns it)."""
        load_model_state(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = float(state["best"])
        self.best_step = state.get("best_step")
        self.method.load_state_dict(state.get("method") or {})
        set_rng_state(state["rng"], self.augment.generator if self.augment is not None else None)

    def load(self, path) -> None:
        """Restore the checkpoint at ``path`` as it is (no config comparison: see :meth:`resume`)."""
        self.load_state(load_checkpoint(path, required=TRAINER_KEYS), path)
        self.resumed_from = Path(path)

    def _claim_out_dir(self) -> None:
        """On the first :meth:`fit`: a run that did not resume from this folder removes the
        checkpoints an earlier run left there (they would pass for this run's), then the
        folder's ``config.yaml`` is this run's."""
        if self._claimed or not self.is_main:
            return
        self._claimed = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ours = self.resumed_from is not None and self.resumed_from.resolve().parent == self.out_dir.resolve()
        if not ours:
            stale = [self.out_dir / n for n in CHECKPOINT_NAMES if (self.out_dir / n).is_file()]
            for p in stale:
                p.unlink()
            if stale:
                _say(f"starting anew in {self.out_dir}: removed {', '.join(p.name for p in stale)} of an earlier run")
        (self.out_dir / "config.yaml").write_text(dump(self.cfg))

    # ------------------------------------------------------------------ one step
    def prepare(self, batch: dict) -> dict:
        batch = to_device(batch, self.device)
        batch["image"] = batch["image"].float()
        batch = self.method.before_augment(batch)
        size = self.cfg["data"].get("input_size")
        if size is not None and tuple(batch["image"].shape[2:]) != tuple(size):
            batch["image"] = resize_image(batch["image"], size)
            for k in LABEL_KEYS:
                if isinstance(batch.get(k), torch.Tensor):
                    v = batch[k]
                    batch[k] = F.interpolate(v.unsqueeze(1).double(), size=tuple(size), mode="nearest-exact")[:, 0].to(v.dtype)
        if self.augment is not None:
            b = batch["image"].shape[0]
            params = self.augment.sample_params(b * self.world, batch["image"].shape[2:], batch["image"].shape[1])
            if self.world > 1:
                params = slice_params(params, self.rank, b)
            batch = self.augment.apply(batch, params)
        with torch.no_grad():
            batch = self.method.targets(batch)
        return batch

    def train_step(self, batch: dict) -> tuple[float, dict]:
        if "image" not in batch:
            raise ValueError(f"step {self.step}: every sample of the batch was skipped as unreadable "
                             f"({batch.get('n_skipped', 0)} samples); drop bad files first with dataset.validate()")
        self.ddp_model.train()
        batch = self.prepare(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.ddp_model(batch["image"])
        loss, logs = self.method.loss(out, batch, self.step, self.total_steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: loss is {float(loss)} ({logs})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg["train"].get("grad_clip")
        if clip:
            self.scaler.unscale_(self.optimizer)
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.method.after_step(self.context())
        return float(loss.detach()), logs

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``stop_at``, which saves ``last.pt`` there, as an interruption would)."""
        t = self.cfg["train"]
        end = self.total_steps if stop_at is None else min(int(stop_at), self.total_steps)
        self._claim_out_dir()
        train_log = CSVLog(self.out_dir / "train_log.csv") if self.is_main else None
        val_log = CSVLog(self.out_dir / "val_log.csv") if self.is_main else None
        if self.is_main:
            train_log.truncate_after(self.step)
            val_log.truncate_after(self.step)
        tb = TensorBoardLog(self.out_dir / "tb", enabled=self.is_main and bool(t.get("tensorboard")))
        loader = train_loader(self.train_set, self.cfg, world_size=self.world, rank=self.rank, start_step=self.step)
        bar = self._bar = None
        if self.is_main and self.show_progress and end > self.step:
            bar = self._bar = progress_bar(total=end, initial=self.step, desc=str(self.cfg["method"]["name"]))
        gbatch = int(self.cfg["data"]["batch_size"]) * self.world
        log_every, val_every = int(t["log_every"] or 0), self.every(t["val_every"])
        ckpt_every = self.every(t["checkpoint_every"])
        losses, t0, t_log = [], time.perf_counter(), time.perf_counter()
        it = iter(loader)
        try:
            while self.step < end:
                batch = next(it)
                loss, logs = self.train_step(batch)
                losses.append(loss)
                now = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                    # refresh=False: the postfix waits for the next throttled redraw (set_postfix's
                    # default redraws at once, on every step, whatever mininterval says)
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{gbatch / max(now - t0, 1e-9):.1f}", refresh=False)
                t0 = now
                if self.is_main and log_every and (self.step % log_every == 0 or self.step == end):
                    row = {"step": self.step, "loss": float(np.mean(losses)), "lr": self.scheduler.get_last_lr()[0],
                           "img_s": gbatch * len(losses) / max(now - t_log, 1e-9), **logs}
                    train_log.write(row)
                    tb.write("train", row, self.step)
                    self.history.append(row)
                    losses, t_log = [], time.perf_counter()
                if val_every and self.val_set is not None and (self.step % val_every == 0 or self.step == self.total_steps):
                    self._validate(val_log, tb)
                    t0 = t_log = time.perf_counter()
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save(self.out_dir / "last.pt")
        except KeyboardInterrupt:
            self.save(self.out_dir / "last.pt")
            raise
        finally:
            # The (infinite) iterator's workers are shut down here, by this process: left to this
            # frame, a reference cycle through it (a callee that kept a caught exception) would
            # hand the iterator to the garbage collector, which may run in a worker forked by the
            # next loader and fail there with "can only test a child process".
            del it
            if bar is not None:
                bar.close()
            self._bar = None
            tb.close()
        self.save(self.out_dir / "last.pt")
        D.barrier()
        return {"step": self.step, "best": self.best, "best_step": self.best_step}

    def every(self, value) -> int:
        """A ``val_every``/``checkpoint_every`` setting in steps (``epoch``: steps per epoch; 0 = never)."""
        return self.steps_per_epoch if value == "epoch" else int(value or 0)

    def _validate(self, val_log, tb) -> None:
        """Validation on every process: each evaluates its shard of the validation set and the
        metrics are gathered (:func:`~mtseg_harness.evaluation.evaluate` with ``gather``), so
        the scores equal a one-process validation; the main process logs, prints and keeps
        ``best.pt``."""
        t = self.cfg["train"]
        limit = t.get("val_max_batches")
        if limit is not None:
            d = self.cfg["data"]
            limit = int(limit) * int(d.get("eval_batch_size") or d["batch_size"])
        loader = eval_loader(self.val_set, self.cfg, rank=self.rank, world=self.world, limit=limit)
        _, summary, _ = evaluate(self.model, self.method.segment, loader, self.device,
                                 num_classes=self.num_classes, ignore_index=self.ignore_index,
                                 class_names=self.class_names, hd=False,
                                 pad_multiple=int(self.cfg["eval"].get("pad_multiple", 32)),
                                 amp_dtype=self.amp_dtype, input_size=self.cfg["data"].get("input_size"),
                                 background_classes=getattr(self.val_set, "background_classes", (0,)),
                                 gather=self.world > 1, window=self.cfg["eval"].get("window"),
                                 window_overlap=float(self.cfg["eval"].get("window_overlap", 0.5)))
        if self.is_main:
            select = t.get("select_metric", "dice_fg")
            score = float(summary.get(select, float("nan")))
            row = {"step": self.step, "dice_fg": summary.get("dice_fg", float("nan")),
                   "dice_fg_n_nan": summary.get("dice_fg_n_nan", 0), "miou": summary.get("miou")}
            val_log.write(row)
            tb.write("val", row, self.step)
            self.val_history.append(row)
            better = bool(np.isfinite(score) and score > self.best)
            if better:
                self.best, self.best_step = float(score), self.step
                self.save(self.out_dir / "best.pt")
            line = (f"step {self.step}/{self.total_steps} validation: {summary_line(summary, ('dice_fg', 'miou'))}"
                    + (f"  best {select} so far" if better else f"  (best {select} {self.best:.4f} at step {self.best_step})"))
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)
        D.barrier()

