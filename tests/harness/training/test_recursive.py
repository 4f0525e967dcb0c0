"""Recursive approximation (Ke et al.): weak/strong labels, rounds of batched level-set growth
with mtseg_kernels.grow_instances, saved approximations, final growth, resume."""

import numpy as np
import pandas as pd
import pytest
import torch

from .helpers import tiny_config
from mtseg_harness.methods import create_method
from mtseg_harness.methods.recursive import ApproxStore, grow, load_round
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
    saved = [load_round(tmp_path / "approximations" / f"round_{r:03d}.npz") for r in range(3)]
    ids = list(saved[0])
    assert len(ids) == n and all(list(s) == ids for s in saved)
    assert all(a.shape == (160, 240) for s in saved for a in s.values())
    # strong images keep their true mask in every round; weak ones only grow (growth contains A)
    by_id = {str(tr.train_set.dataset[i]["case_id"]): i for i in range(n)}
    strong = [c for c in ids if by_id[c] in tr.train_set.strong]
    assert len(strong) == round(0.1 * n)
    for c in strong:
        truth = tr.train_set.dataset[by_id[c]]["mask"].numpy()
        assert all((s[c] == truth).all() for s in saved)
    weak = [c for c in ids if c not in strong]
    for a, b in zip(saved, saved[1:]):
        assert all(((b[c] > 0) >= (a[c] > 0)).all() for c in weak)
    # the last round is what the method holds, on disk
    assert all(np.array_equal(saved[-1][c], tr.method.current[c].numpy()) for c in ids)
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


def test_approximations_live_in_a_memory_mapped_file_per_rank(tmp_path):
    cfg = tiny_config(tmp_path, method={**RA, "update_every": 1}, train={"steps": 2}, data=SMALL)
    tr = build_trainer(cfg)
    tr.fit()
    store = tr.method.current
    assert isinstance(store, ApproxStore) and isinstance(store.array, np.memmap)
    assert store.path == tmp_path / "approximations" / "current.rank0.uint8"
    n = len(tr.train_set)
    assert store.path.stat().st_size == n * 160 * 240  # one byte per pixel, nothing else
    # the file holds what the method reads: the last round saved
    last = load_round(tmp_path / "approximations" / "round_001.npz")
    raw = np.fromfile(store.path, dtype=np.uint8)
    for i, c in enumerate(store.ids):
        assert np.array_equal(raw[i * 160 * 240:(i + 1) * 160 * 240].reshape(160, 240), last[c])


def test_store_round_trip_with_images_of_different_sizes(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"a": rng.integers(0, 3, (5, 7)), "b": rng.integers(0, 3, (9, 4)), "c": rng.integers(0, 3, (3, 8))}
    store = ApproxStore.write(tmp_path / "s.uint8", ((k, torch.from_numpy(v)) for k, v in maps.items()), np.uint8)
    assert list(store) == ["a", "b", "c"] and len(store) == 3 and "b" in store and "z" not in store
    for k, v in maps.items():
        assert np.array_equal(store[k].numpy(), v)
    store["b"] = torch.full((9, 4), 2)
    with pytest.raises(ValueError, match="holds a"):
        store["a"] = torch.zeros(7, 5)
    again = ApproxStore.from_state(tmp_path / "t.uint8", store.state(), np.uint8)
    assert np.array_equal(again["b"].numpy(), np.full((9, 4), 2)) and np.array_equal(again["c"].numpy(), maps["c"])
    assert (tmp_path / "t.uint8").stat().st_size == 35 + 36 + 24


def test_a_round_on_disk_equals_a_round_in_memory():
    """The label update gives the same approximations whether they are stored in the
    memory-mapped store or in a dict of tensors (batches of two image sizes)."""
    from mtseg_harness.methods import TrainContext
    from mtseg_harness.models import ModelOutput

    rng = np.random.default_rng(1)

    class Thresh(torch.nn.Module):  # segments the image: foreground where it is bright
        def forward(self, x):
            fg = (x[:, :1] > 0.5).float()
            return ModelOutput(seg=torch.cat([1 - fg, fg], 1) * 5, approx=torch.cat([1 - fg, fg], 1))

    batches, weak = [], {}
    for b, (h, w) in enumerate([(12, 16), (10, 9)]):
        image = torch.from_numpy(rng.random((2, 1, h, w))).float()
        ids = [f"{b}{i}" for i in range(2)]
        for i, c in enumerate(ids):
            seed = torch.zeros(h, w, dtype=torch.uint8)
            ys, xs = np.nonzero(image[i, 0].numpy() > 0.5)
            seed[ys[0], xs[0]] = 1
            weak[c] = seed
        batches.append({"image": image, "case_id": ids, "strong": torch.tensor([False, b == 1]),
                        "mask": (image[:, 0] > 0.5).long()})

    def run(current):
        m = create_method("recursive_approx", 2, lam=2.0, save_rounds=False)
        m.current = current
        ctx = TrainContext(step=1, total_steps=4, dataset=None, batches=lambda batch_size: batches,
                           predict=lambda image, segment: segment(Thresh(), image), out_dir=None,
                           save_table=lambda *a, **k: None)
        m.update(ctx)
        m.update(ctx)
        return m

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        on_disk = run(ApproxStore.write(f"{d}/s.uint8", ((c, v) for c, v in weak.items()), np.uint8))
        in_ram = run({c: v.clone() for c, v in weak.items()})
        for c in weak:
            assert torch.equal(on_disk.current[c].long(), in_ram.current[c].long()), c
        assert on_disk.rounds == in_ram.rounds
        assert any(not torch.equal(on_disk.current[c].long(), weak[c].long()) for c in weak)  # it grew
        assert torch.equal(on_disk.current["11"].long(), batches[1]["mask"][1])  # strong: the true mask
