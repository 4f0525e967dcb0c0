"""Recursive approximation (Ke et al.): weak/strong labels, rounds of batched level-set growth
with mtseg_kernels.grow_instances, saved approximations, final growth, resume."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from mtseg_harness.methods import create_method
from mtseg_harness.methods.recursive import grow
from mtseg_harness.models import ApproxHeadSpec, Heads
from mtseg_harness.runs import build_trainer, run_eval
from mtseg_harness.training.checkpoint import load_checkpoint

RA = {"name": "recursive_approx", "strong_fraction": 0.1, "update_every": 2, "update_batch_size": 40}
# the 20 validation images of the sample as the training set keep these tests short
SMALL = {"splits": {"train": "val", "val": "val", "test": "test"}}


def _disk(shape, c, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r


def test_grow_properties():
    s = torch.from_numpy(_disk((40, 60), (20, 15), 10) | _disk((40, 60), (20, 42), 10)).long()[None]
    seeds = torch.zeros_like(s)
    seeds[0, 18:22, 13:17] = 1      # class 1 seed in the left disk
    seeds[0, 18:22, 40:44] = 2      # class 2 seed in the right disk
    assert torch.equal(grow(seeds, None, s, 0.0), seeds)            # lambda = 0: the seeds back
    small, big = grow(seeds, None, s, 0.5), grow(seeds, None, s, 1e6)
    assert ((small > 0) >= (seeds > 0)).all() and ((big > 0) >= (small > 0)).all()  # contains A, monotone
    assert torch.equal(big > 0, s > 0)                                 # -> S when every part holds a seed
    assert set(big[0][s[0] > 0].unique().tolist()) == {1, 2}
    assert (big[0, :, :28] != 2).all() and (big[0, :, 32:] != 1).all()  # objects keep their class, never merge


def test_weak_and_strong_labels_and_losses():
    m = create_method("recursive_approx", 2, strong_fraction=0.5)
    assert m.heads() == Heads(approx=ApproxHeadSpec(num_classes=2))
    mask = torch.ones(2, 4, 4, dtype=torch.long)
    weak = torch.zeros_like(mask)
    weak[:, 1:3, 1:3] = 1
    seg = torch.randn(2, 2, 4, 4)
    approx = torch.randn(2, 2, 4, 4)
    from mtseg_harness.methods import losses
    from mtseg_harness.models import ModelOutput

    out = ModelOutput(seg=seg, side=(), hog=(), presence=None, scene=None, approx=approx)
    loss, logs = m.loss(out, {"mask": mask, "weak": weak, "strong": torch.tensor([True, False])}, 0, 10)
    seg_t = mask.clone()
    seg_t[1] = 255  # the weak image's true mask is never used for training
    expected = losses.cross_entropy(seg, seg_t) + losses.cross_entropy(approx, weak)
    torch.testing.assert_close(loss, expected)


def test_rounds_on_the_embedded_sample(tmp_path):
    cfg = tiny_config(tmp_path, method=RA, train={"steps": 5, "val_every": 5}, data=SMALL)
    tr = build_trainer(cfg)
    tr.fit()
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds["round"].tolist() == [0, 1, 2] and rounds["step"].tolist() == [0, 2, 4]
    assert ((rounds["dice_vs_true"] > 0) & (rounds["dice_vs_true"] <= 1)).all()
    n = len(tr.train_set)
    assert rounds["n_weak"].tolist() == [n - round(0.1 * n)] * 3
    saved = [np.load(tmp_path / "approximations" / f"round_{r:03d}.npz") for r in range(3)]
    assert all(s["approx"].shape == (n, 160, 240) for s in saved)
    ids = saved[0]["case_id"].tolist()
    # strong images keep their true mask in every round; weak ones only grow (growth contains A)
    by_id = {str(tr.train_set.dataset[i]["case_id"]): i for i in range(n)}
    order = [by_id[c] for c in ids]
    strong = [j for j, i in enumerate(order) if i in tr.train_set.strong]
    assert len(strong) == round(0.1 * n)
    for j in strong:
        truth = tr.train_set.dataset[order[j]]["mask"].numpy()
        assert all((s["approx"][j] == truth).all() for s in saved)
    weak = [j for j in range(n) if j not in strong]
    for a, b in zip(saved, saved[1:]):
        assert ((b["approx"][weak] > 0) >= (a["approx"][weak] > 0)).all()
    table, summary, _ = run_eval(cfg, split_key="test", out_dir=tmp_path / "eval", quiet=True)
    assert len(table) == 40


def test_resume_keeps_the_approximations(tmp_path):
    full = build_trainer(tiny_config(tmp_path / "full", method=RA, train={"steps": 5}, data=SMALL))
    full.fit()
    part = build_trainer(tiny_config(tmp_path / "part", method=RA, train={"steps": 5}, data=SMALL))
    part.fit(stop_at=3)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["method"]["round"] == 1
    resumed = build_trainer(tiny_config(tmp_path / "part", method=RA, train={"steps": 5, "resume": True}, data=SMALL))
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert full.method.round == resumed.method.round == 2
    assert all(torch.equal(full.method.current[c], resumed.method.current[c]) for c in full.method.current)


def test_on_real_hc18(tmp_path, shared_data):
    cfg = tiny_config(tmp_path, method={**RA, "strong_fraction": 0.2}, train={"steps": 3},
                      data={"root": str(shared_data / "hc18"), **SMALL})
    tr = build_trainer(cfg)
    tr.fit()
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert rounds["round"].tolist() == [0, 1] and rounds["n_weak"].tolist() == [16, 16]


def test_label_update_grows_inside_the_plain_segmentation_through_the_context():
    """A round grows each weak image's approximation inside the model's arg-max segmentation
    (not inside the final-growth output used at evaluation), using only what the trainer
    lends the method (TrainContext)."""
    import torch.nn.functional as F

    from mtseg_harness.methods import TrainContext
    from mtseg_harness.models import ModelOutput

    seg = torch.zeros(1, 8, 8, dtype=torch.long)
    seg[0, 1:7, 1:7] = 1                      # the model's segmentation S: a 6 x 6 square
    approx = torch.zeros_like(seg)
    approx[0, 5:7, 5:7] = 1                   # its approximation output: a corner of S, away from the seed

    def logits(labels, b):
        return F.one_hot(labels, 2).movedim(-1, 1).float().expand(b, -1, -1, -1)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return ModelOutput(seg=logits(seg, x.shape[0]), approx=logits(approx, x.shape[0]))

    m = create_method("recursive_approx", 2, lam=1e6, lam_eval=0.0, final_growth=True, save_rounds=False)
    seed = torch.zeros(8, 8, dtype=torch.uint8)
    seed[3, 3] = 1
    m.current = {"a": seed}
    batch = {"image": torch.zeros(1, 1, 8, 8), "case_id": ["a"], "strong": torch.tensor([False]), "mask": seg.clone()}
    seen = []

    def predict(image, segment):
        seen.append(segment)
        return segment(Fixed(), image).cpu()

    ctx = TrainContext(step=2, total_steps=10, dataset=None, batches=lambda batch_size: [batch], predict=predict,
                       out_dir=None, save_table=lambda *a, **k: None)
    m.update(ctx)
    assert len(seen) == 1 and m.round == 1
    assert torch.equal(m.current["a"].long(), seg[0])  # grown to all of S (lambda large)
    assert m.rounds[-1] == {"round": 1, "step": 2, "dice_vs_true": 1.0, "n_weak": 1}
