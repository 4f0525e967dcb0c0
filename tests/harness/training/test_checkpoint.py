"""Checkpoint files: only tensors and plain types (plain ``torch.load(weights_only=True)`` reads
them), RNG states that restore every generator, the umask's file mode, one-line errors for
every kind of damage (checked against a checksum of the payload), NaN/Inf refused, writes
that a kill or a full disk cannot break, and the models README's loading snippet."""

import collections
import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .helpers import REPO, tiny_config
from mtseg_harness.runs import build_trainer
from mtseg_harness.training.checkpoint import (TRAINER_KEYS, CheckpointError, load_checkpoint, load_model_state,
                                               model_weights, payload_checksum, remove_partial_writes, rng_state,
                                               save_checkpoint, set_rng_state)

PLAIN = (str, int, float, bool, type(None))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run (HOG-MTL: a head beyond the plain UNet) with its last.pt; tests copy the file."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, method={"name": "hog_mtl"}, train={"steps": 2},
                      sched={"name": "multistep", "milestones": [1], "gamma": 0.5})
    tr = build_trainer(cfg)
    tr.fit()
    return tr, out / "last.pt"


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _walk(x, where="checkpoint"):
    """Every (where, type) of a loaded object that is not a tensor, a container or a plain value."""
    if isinstance(x, torch.Tensor):
        return []
    if isinstance(x, dict):
        assert all(isinstance(k, (str, int)) for k in x), where
        return [b for k, v in x.items() for b in _walk(v, f"{where}.{k}")]
    if isinstance(x, (list, tuple)):
        return [b for i, v in enumerate(x) for b in _walk(v, f"{where}[{i}]")]
    return [] if isinstance(x, PLAIN) else [(where, type(x))]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def _one_line_error(path, match=None) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, required=TRAINER_KEYS)
    text = str(info.value)
    assert "\n" not in text and str(path) in text, text
    if match:
        assert re.search(match, text), text
    return text


# ------------------------------------------------------------------------------ what is stored
def test_plain_torch_loads_it_with_weights_only_and_it_holds_no_python_objects(trained):
    tr, path = trained
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain PyTorch, no harness
    assert set(TRAINER_KEYS) <= set(state)
    assert _walk(state) == []
    assert isinstance(state["rng"]["python"]["state"], torch.Tensor)
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert state["scheduler"]["milestones"] == {1: 1}  # MultiStepLR's Counter, stored as a dict
    fresh = build_trainer(tiny_config(path.parent / "fresh", method={"name": "hog_mtl"})).model
    fresh.load_state_dict(state["model"])
    for k, v in tr.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_rng_state_restores_python_numpy_torch_and_a_generator_through_a_file(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(6)
    random.gauss(0, 1)                 # leaves python's second Gaussian cached (gauss_next)
    np.random.standard_normal()        # leaves numpy's legacy cached Gaussian
    path = save_checkpoint({"model": {}, "rng": rng_state(gen)}, tmp_path / "rng.pt")

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist())

    first = draw()
    draw()  # move every generator on
    set_rng_state(load_checkpoint(path)["rng"], gen)
    assert draw() == first


def test_a_multistep_schedule_resumes_through_a_file(tmp_path):
    """MultiStepLR keeps its milestones in a Counter (a repeated milestone decays twice): stored as a
    dict, restored as a Counter, the schedule goes on as an uninterrupted one."""
    from mtseg_harness.training.checkpoint import load_scheduler_state, scheduler_state

    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 2, 4], gamma=0.1)

    opt, sched = make()
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if len(lrs) == 3:
            path = save_checkpoint({"model": {}, "optimizer": opt.state_dict(), "scheduler": scheduler_state(sched)},
                                   tmp_path / "last.pt")
    assert lrs == pytest.approx([1, 1, 0.01, 0.01, 0.001, 0.001])
    opt2, sched2 = make()
    state = load_checkpoint(path)
    opt2.load_state_dict(state["optimizer"])
    load_scheduler_state(sched2, state["scheduler"])
    assert isinstance(sched2.milestones, collections.Counter) and sorted(sched2.milestones.elements()) == [2, 2, 4]
    assert [opt2.param_groups[0]["lr"]] + [(opt2.step(), sched2.step(), opt2.param_groups[0]["lr"])[2]
                                          for _ in range(2)] == lrs[3:]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_checkpoint({"model": {"w": torch.ones(3)}}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_rejects_python_objects_and_nan_weights_keeping_the_old_file(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, tmp_path / "last.pt")
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"checkpoint\.rng\.numpy.*numpy"):
        save_checkpoint({"model": {}, "rng": {"numpy": np.zeros(3)}}, path)
    with pytest.raises(TypeError, match="collections.Counter"):
        save_checkpoint({"model": {}, "scheduler": {"milestones": collections.Counter([3])}}, path)
    with pytest.raises(CheckpointError, match=r"not writing .*'w' holds 1 NaN/Inf"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------------------------------ damaged files
def test_missing_empty_truncated_and_random_files_give_one_line(tmp_path, trained):
    _, good = trained
    _one_line_error(tmp_path / "nope.pt", "not found")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _one_line_error(empty, "empty")
    data = good.read_bytes()
    for frac in (0.05, 0.5, 0.95):
        cut = tmp_path / f"cut{frac}.pt"
        cut.write_bytes(data[: int(len(data) * frac)])
        _one_line_error(cut, "truncated or corrupted|not a PyTorch")
    cut = tmp_path / "cut_last_byte.pt"
    cut.write_bytes(data[:-1])
    _one_line_error(cut)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _one_line_error(noise, "not a PyTorch checkpoint, or is corrupted")
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(bytes(100))
    _one_line_error(zeros, "not a PyTorch checkpoint, or is corrupted")


def test_a_flipped_byte_in_a_weight_is_caught_by_the_checksum(tmp_path, trained):
    tr, good = trained
    data = bytearray(good.read_bytes())
    w = tr.model.state_dict()["encoder.0.0.0.weight"].cpu().contiguous().numpy().tobytes()
    at = data.find(w[:32])
    assert at > 0 and data.count(w[:32]) == 1  # the weight's bytes, stored as they are
    data[at + 5] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    # the change is invisible to torch.load: the weight just differs
    raw = torch.load(bad, weights_only=True)
    assert not torch.equal(raw["model"]["encoder.0.0.0.weight"], tr.model.state_dict()["encoder.0.0.0.weight"])
    _one_line_error(bad, "checksum")
    with pytest.raises(CheckpointError, match="checksum"):
        model_weights(bad)


def test_a_flipped_byte_anywhere_either_fails_in_one_line_or_changes_nothing(tmp_path, trained):
    _, good = trained
    data = good.read_bytes()
    reference = load_checkpoint(good, required=TRAINER_KEYS)
    rng = np.random.default_rng(1)
    failed = 0
    for i, pos in enumerate(sorted(rng.choice(len(data), 40, replace=False))):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        path = tmp_path / f"f{i}.pt"
        path.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(path, required=TRAINER_KEYS)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            failed += 1
        else:
            assert _equal(state, reference), pos  # e.g. a byte of zip padding: the payload is whole
        path.unlink()
    assert failed >= 20  # most of the file is payload


def test_missing_entries_python_objects_and_nan_weights_are_refused(tmp_path, trained):
    _, good = trained
    state = torch.load(good, weights_only=True)
    short = {k: v for k, v in state.items() if k != "optimizer"}
    short["checksum"] = payload_checksum(short)
    torch.save(short, tmp_path / "short.pt")
    _one_line_error(tmp_path / "short.pt", r"lacks \['optimizer'\]")

    nan = {**state, "model": {**state["model"]}}
    nan["model"]["encoder.0.0.0.weight"] = nan["model"]["encoder.0.0.0.weight"].clone()
    nan["model"]["encoder.0.0.0.weight"][0, 0, 0, 0] = float("inf")
    nan["checksum"] = payload_checksum(nan)
    torch.save(nan, tmp_path / "inf.pt")
    _one_line_error(tmp_path / "inf.pt", r"'encoder.0.0.0.weight' holds 1 NaN/Inf")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        model_weights(tmp_path / "inf.pt")

    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "foreign.pt")
    _one_line_error(tmp_path / "foreign.pt", "not an mtseg checkpoint")


class _Payload:
    """What an untrusted checkpoint can carry: unpickling it runs code (here: writes a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_a_pickled_object_is_never_run(tmp_path, trained):
    _, good = trained
    marker = tmp_path / "marker"
    state = torch.load(good, weights_only=True)
    torch.save({**state, "rng": {**state["rng"], "evil": _Payload(marker)}}, tmp_path / "evil.pt")
    torch.save({**state, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")  # an older mtseg
    _one_line_error(tmp_path / "evil.pt", r"Python objects other than tensors and plain types \(.*pathlib")
    _one_line_error(tmp_path / "old.pt", r"Python objects other than tensors and plain types \(numpy")
    with pytest.raises(CheckpointError):
        model_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_model_weights_reads_checkpoints_and_bare_state_dicts(tmp_path, trained):
    tr, good = trained
    weights = model_weights(good)
    assert weights.keys() == tr.model.state_dict().keys()
    torch.save(tr.model.state_dict(), tmp_path / "bare.pt")
    bare = model_weights(tmp_path / "bare.pt")
    assert all(torch.equal(bare[k], weights[k]) for k in weights)
    torch.save({"w": torch.tensor([float("nan")])}, tmp_path / "bare_nan.pt")
    with pytest.raises(CheckpointError, match="bare_nan.pt.*NaN/Inf"):
        model_weights(tmp_path / "bare_nan.pt")


def test_a_model_that_does_not_fit_gives_one_line(trained):
    from mtseg_harness.models import create_model

    _, good = trained
    other = create_model("unet", 1, 2, base_channels=8, depth=2)
    with pytest.raises(CheckpointError) as info:
        load_model_state(other, model_weights(good), good)
    text = str(info.value)
    assert "\n" not in text and str(good) in text
    assert "[4, 1, 3, 3] in the checkpoint, [8, 1, 3, 3] here" in text  # the first conv
    assert "not in this model (e.g. hog_head." in text                   # the HOG head the UNet lacks


# ------------------------------------------------------------------------------ interrupted writes
KILL_MID_WRITE = r"""
import os, signal, sys, torch
from mtseg_harness.training import checkpoint as ck

path = sys.argv[1]
ck.save_checkpoint({"model": {"w": torch.ones(50_000)}, "step": 1}, path)
real = torch.save

def half_then_die(obj, f):
    import io
    buf = io.BytesIO()
    real(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_then_die
ck.save_checkpoint({"model": {"w": torch.zeros(50_000)}, "step": 2}, path)
"""


def test_kill_9_mid_write_keeps_last_pt_and_the_next_start_removes_the_partial_file(tmp_path):
    path = tmp_path / "run" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], env=env, capture_output=True,
                          timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = list(path.parent.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(50_000))
    keep = path.parent / ".notes.tmp"
    keep.write_text("not ours")
    assert remove_partial_writes(path.parent) == partial
    assert sorted(p.name for p in path.parent.iterdir()) == [".notes.tmp", "last.pt"]


def test_the_trainer_removes_partial_writes_when_it_starts(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    for name in (".last.pt.a1b2c3.tmp", ".best.pt.d4e5f6.tmp", ".other.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    build_trainer(tiny_config(tmp_path, train={"steps": 1}))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [".other.tmp"]
    err = capsys.readouterr().err
    assert ".last.pt.a1b2c3.tmp" in err and ".best.pt.d4e5f6.tmp" in err


def test_a_full_disk_keeps_last_pt(tmp_path):
    """A write that fails for lack of space (simulated with a file-size limit: the write
    fails with EFBIG where a full disk gives ENOSPC) leaves the old file and no partial one."""
    path = save_checkpoint({"model": {"w": torch.ones(10)}, "step": 1}, tmp_path / "last.pt")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write checkpoint .*last.pt: File too large; the file there is kept"):
            save_checkpoint({"model": {"w": torch.zeros(1_000_000)}, "step": 2}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------------------------------ the README's snippet
def _readme_snippet() -> str:
    text = (REPO / "harness" / "models" / "README.md").read_text()
    section = text.split("## Weights", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the Weights section of harness/models/README.md has no python block"
    return blocks[0]


def test_models_readme_loading_snippet_runs_on_a_demo_checkpoint(tmp_path, monkeypatch):
    snippet = _readme_snippet()
    path = re.search(r'model_weights\("([^"]+)"\)', snippet).group(1)
    # a run trained as the snippet says (the demo's baseline: UNet, base width 8, 1 channel in, 2 classes)
    cfg = tiny_config(tmp_path / Path(path).parent, model={"name": "unet", "options": {"base_channels": 8, "depth": 4}},
                      data={"input_size": [32, 48]}, train={"steps": 1, "val_every": 1})
    tr = build_trainer(cfg)
    tr.fit()
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "harness/models/README.md", "exec"), scope)
    for name, model in ((n, v) for n, v in scope.items() if isinstance(v, torch.nn.Module)):
        for k, v in tr.model.state_dict().items():
            assert torch.equal(model.state_dict()[k].cpu(), v.cpu()), (name, k)
    assert any(isinstance(v, torch.nn.Module) for v in scope.values())
