"""Timing of one training step per method (``mtseg bench``, ``benchmarks/bench_step.py``).

Synthetic batch: random images with one random filled ellipse each (class 1), on the
device; a step = auxiliary labels (on the device) + forward + loss + backward + Adam step,
exactly the trainer's order (:meth:`Trainer.prepare` without augmentation, then
:meth:`Trainer.train_step`'s body).
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from ..evaluation.report import format_table
from .assemble import build_method, build_model, load_config


def synthetic_batch(batch: int, size=(256, 256), channels: int = 1, num_classes: int = 2, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    masks = []
    for _ in range(batch):
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.3) * torch.tensor([h, w])
        ry, rx = (torch.rand(2, generator=g) * 0.2 + 0.15) * torch.tensor([h, w])
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).long() * (num_classes - 1))
    mask = torch.stack(masks)
    image = 0.5 * mask.unsqueeze(1).float().expand(-1, channels, -1, -1) + 0.3 * torch.rand(batch, channels, h, w, generator=g)
    return {"image": image.to(device), "mask": mask.to(device)}


class StepRunner:
    """Builds a model with the method's heads; ``run()`` does one full training step."""

    def __init__(self, method: str, model: str = "unet", size=(256, 256), batch: int = 4, channels: int = 1,
                 num_classes: int = 2, device="cpu", model_options: dict | None = None, method_options: dict | None = None):
        cfg = load_config(base={"method": {"name": method, **(method_options or {})},
                                "model": {"name": model, "options": dict(model_options or {})}})
        torch.manual_seed(0)
        self.method = build_method(cfg, num_classes, ignore_index=255)
        self.model = build_model(cfg, self.method, channels, num_classes).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-4)
        self.batch = synthetic_batch(batch, size, channels, num_classes, device=device)
        self.total = 1000
        self.step = 999  # TDSNet: the last stage, every term on

    def aux(self):
        with torch.no_grad():
            return self.method.targets(dict(self.batch))

    def run(self):
        b = self.aux()
        out = self.model(b["image"])
        loss, _ = self.method.loss(out, b, self.step, self.total)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def time_steps(methods=("baseline", "hog_mtl", "tdsnet", "cmunet"), repeat: int = 5, warmup: int = 1, **kw) -> list[dict]:
    """Median step time and auxiliary-label time per method; the baseline is the reference."""
    rows = []
    for m in methods:
        r = StepRunner(m, **kw)
        for _ in range(warmup):
            r.run()
        steps, aux = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            r.aux()
            aux.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r.run()
            steps.append(time.perf_counter() - t0)
        rows.append({"method": m, "step_s": sorted(steps)[len(steps) // 2], "aux_labels_s": sorted(aux)[len(aux) // 2]})
    base = next((r["step_s"] for r in rows if r["method"] == "baseline"), None)
    for r in rows:
        r["aux_share"] = r["aux_labels_s"] / r["step_s"]
        if base:
            r["vs_baseline"] = r["step_s"] / base
    return rows


def bench_report(methods, repeat: int = 5, size=(256, 256), batch: int = 4, model: str = "unet",
                 base_channels: int = 16, threads: int | None = None) -> str:
    """``mtseg bench``: the table of :func:`time_steps` with a line saying what was timed."""
    if threads:
        torch.set_num_threads(threads)
    rows = time_steps(methods, repeat=repeat, size=tuple(size), batch=batch, model=model,
                      model_options={"base_channels": base_channels} if model.startswith("unet") else None)
    head = (f"training step, {model}, batch {batch}, {size[0]}x{size[1]}, {torch.get_num_threads()} threads, CPU"
            f" (median of {repeat})")
    return head + "\n" + format_table(pd.DataFrame(rows), ".4f")
