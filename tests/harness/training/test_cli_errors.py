"""``mtseg``: a user error is one line on stderr (what was expected, what was given, what
to do) and a non-zero exit; the traceback only with ``--debug`` (issue 11, finding 7)."""

import os
import subprocess
import sys

import pytest
import torch

from .helpers import REPO, SAMPLE
from mtseg_harness import runs
from mtseg_harness.cli import main
from mtseg_harness.config import ConfigError

import dataset_writers as W

QUIET = ["train.progress=false", "train.tensorboard=false", "data.num_workers=0", "train.val_every=0",
         "model.options={base_channels: 4, depth: 1}", "data.input_size=[32,48]", "train.steps=1"]


def _one_line(capsys, rc, expected_rc=None) -> str:
    out = capsys.readouterr()
    assert rc != 0 if expected_rc is None else rc == expected_rc
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("mtseg: ") and "Traceback" not in out.err
    return lines[0]


def test_a_missing_data_root(tmp_path, capsys):
    missing = tmp_path / "HC18"
    line = _one_line(capsys, main(["train", "--set", f"data.root={missing}", f"train.out_dir={tmp_path}", *QUIET]), 2)
    assert "data.root" in line and str(missing) in line and "not found" in line  # what was given
    assert "expected the folder of the unmodified hc18 download" in line          # what was expected
    assert "set data.root=" in line                                               # what to do


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    line = _one_line(capsys, main(["train", "--set", "device=cuda", f"data.root={SAMPLE}", f"train.out_dir={tmp_path}",
                                   *QUIET]), 2)
    assert "device=cuda: expected a CUDA GPU, but torch sees none" in line and "set device=cpu" in line


def test_float16_autocast_on_the_cpu(tmp_path, capsys):
    line = _one_line(capsys, main(["train", "--set", "device=cpu", "train.amp=fp16", f"data.root={SAMPLE}",
                                   f"train.out_dir={tmp_path}", *QUIET]), 2)
    assert "train.amp=fp16: expected a CUDA device" in line and "set train.amp=bf16 or off" in line


def test_a_typo_in_model_options(tmp_path, capsys):
    line = _one_line(capsys, main(["train", "--set", f"train.out_dir={tmp_path}", *QUIET, "model.options.base_channel=4"]),
                     2)
    assert "unknown key 'model.options.base_channel' (did you mean model.options.base_channels?)" in line


@pytest.mark.parametrize("override,needle", [
    ("train.steps=abc", "train.steps: expected a valid integer"),
    ("data.batch_size=0", "data.batch_size: expected greater than 0; given 0"),
    ("data.batchsize=2", "did you mean data.batch_size?"),
    ("method.name=hog_mlt", "unknown method 'hog_mlt' (did you mean hog_mtl?)"),
])
def test_bad_config_values(override, needle, tmp_path, capsys):
    line = _one_line(capsys, main(["train", "--set", f"train.out_dir={tmp_path}", *QUIET, override]), 2)
    assert line.startswith("mtseg: config error: ") and needle in line and "--set" in line


def test_a_missing_or_broken_config_file(tmp_path, capsys):
    line = _one_line(capsys, main(["train", "--config", str(tmp_path / "nope.yaml")]), 2)
    assert "cannot read config" in line and "nope.yaml" in line and "check the path" in line
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1, 2\ntrain: {}\n")
    line = _one_line(capsys, main(["config", "--config", str(tmp_path / "bad.yaml")]), 2)
    assert "is not valid YAML" in line


def test_a_bad_data_file_names_the_file(tmp_path, capsys):
    root = tmp_path / "HC18"
    W.write_hc18(root, n=4)
    (root / "training_set_pixel_size_and_HC.csv").write_bytes(b"\x00\x01 not a table")
    line = _one_line(capsys, main(["train", "--set", f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", *QUIET]),
                     1)
    assert line.startswith("mtseg: data error: ") and "training_set_pixel_size_and_HC.csv" in line
    assert "on_error=skip" in line


def test_a_missing_checkpoint(tmp_path, capsys):
    line = _one_line(capsys, main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]))
    assert "nope.pt" in line and "--debug" in line


def test_a_command_line_mistake(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--confg", "x.yaml"])
    line = _one_line(capsys, info.value.code, 2)
    assert "unrecognized arguments: --confg" in line and "--help" in line


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def boom(cfg):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(runs, "train", boom)
    line = _one_line(capsys, main(["train", "--set", "train.steps=1"]), 1)
    assert line == "mtseg: error: RuntimeError: something broke over two lines (--debug shows the traceback)"


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def stop(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", stop)
    assert _one_line(capsys, main(["train"]), 130) == "mtseg: interrupted"


@pytest.mark.parametrize("argv", [["--debug", "train", "--set", "train.steps=abc"],
                                  ["train", "--debug", "--set", "train.steps=abc"]])
def test_debug_raises_the_error_before_or_after_the_command(argv):
    with pytest.raises(ConfigError, match="train.steps"):
        main(argv)


def test_the_command_in_a_fresh_process_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mtseg_harness.cli", "train", "--set", f"data.root={tmp_path / 'nope'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "data.root" in out.stderr


def test_eval_draws_as_many_overlays_as_eval_overlays_says(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", f"data.root={SAMPLE}", f"train.out_dir={run}", "eval.hd=false", "device=cpu",
                 *QUIET]) == 0
    base = ["eval", "--set", f"data.root={SAMPLE}", f"train.out_dir={run}", "eval.hd=false", "device=cpu",
            "model.options={base_channels: 4, depth: 1}", "data.input_size=[32,48]", "data.num_workers=0",
            "--split", "val"]
    assert main(base + ["eval.overlays=0", "--out", str(tmp_path / "none")]) == 0
    assert main(base + ["eval.overlays=2", "--out", str(tmp_path / "two")]) == 0
    assert not (tmp_path / "none" / "overlays.png").exists()   # today: drawn whatever eval.overlays says
    assert (tmp_path / "two" / "overlays.png").is_file()
