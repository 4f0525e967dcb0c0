"""HOG-MTL's EndoVis 2017 report: mIoU per test video beside the paper's number, on fixture
data with hand-computed answers, and through ``mtseg eval`` on a one-step run."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "data"))

import dataset_writers as W  # noqa: E402
from mtseg_harness.data import SegmentationDataset, create_dataset  # noqa: E402
from mtseg_harness.evaluation import evaluate  # noqa: E402
from mtseg_harness.evaluation.report import paper_comparison, paper_lines  # noqa: E402
from mtseg_harness.training.data import eval_loader  # noqa: E402

REPO = HERE.parents[2]
H, W_ = 200, 420
FG = 2 * 40 * 70  # two instruments of 40 x 70 pixels (writer's layout); "Other" is background in binary


@pytest.fixture(autouse=True)
def _fresh_index():
    SegmentationDataset.clear_memory_cache()
    yield


def _perfect_on_9_empty_on_10(model, image, batch, out_size=None):
    pred = batch["mask"].clone()
    pred[batch["video"] == 10] = 0
    return pred


def test_per_video_miou_and_the_papers_numbers_on_fixture_data(tmp_path):
    W.write_endovis17(tmp_path, videos=(9, 10), frames=(0, 1), size=(H, W_))
    ds = create_dataset("endovis17", tmp_path, split="test", target="binary", crop=False, fold=None)
    loader = eval_loader(ds, {"data": {"batch_size": 3, "num_workers": 0}})
    _, summary, _ = evaluate(torch.nn.Identity(), _perfect_on_9_empty_on_10, loader, "cpu", num_classes=2,
                             ignore_index=255, hd=False, pad_multiple=4, extra_metrics=ds.extra_metrics)
    # video 9 perfect: IoU 1 for both classes. Video 10 all background: background IoU =
    # background pixels / all pixels, instrument IoU 0.
    v10 = ((H * W_ - FG) / (H * W_) + 0.0) / 2
    assert summary["by_video"][9]["miou"] == pytest.approx(1.0)
    assert summary["by_video"][10]["miou"] == pytest.approx(v10)
    paper = {"source": "test table", "metric": "miou", "group": "video", "values": {"9": 0.5, "all": None}}
    df = paper_comparison(summary, paper)
    assert df["group"].tolist() == ["video 9", "video 10", "all"]
    assert df["ours"].tolist() == pytest.approx([1.0, v10, (1.0 + v10) / 2])
    assert df["paper"].iloc[0] == 0.5 and df["paper"].iloc[1:].isna().all()
    lines = paper_lines(df)
    assert lines[1] == "  video 9: miou 1.0000  (paper 0.5000)"
    assert lines[2] == f"  video 10: miou {v10:.4f}  (paper not known to us)"
    with pytest.raises(KeyError, match="reports no such group"):
        paper_comparison(summary, {**paper, "group": "part"})
    with pytest.raises(KeyError, match="not in the evaluation summary"):
        paper_comparison(summary, {**paper, "metric": "mIoU"})
    whole = paper_comparison(summary, {"source": "s", "metric": "miou", "group": None, "values": {}})
    assert whole["ours"].tolist() == [summary["miou"]] and whole["group"].tolist() == ["all"]


# one config per target, both kinds (every endovis17 config builds in tests/harness/training/test_configs.py)
NEW_CONFIGS = ["endovis17_binary_unet_hog.yaml", "endovis17_parts_u2net_baseline.yaml", "endovis17_type_u2net_hog.yaml"]


@pytest.fixture(scope="module")
def ev17_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev17")
    W.write_endovis17(root, videos=(1, 2, 9, 10), frames=(0, 1), size=(H, W_))  # small frames: no crop
    return root


def _cfg(name, root, out_dir):
    from mtseg_harness.runs import load_config

    cfg = load_config(REPO / "configs" / name, [
        f"data.root={root}", f"train.out_dir={out_dir}", "train.progress=false", "train.tensorboard=false",
        "data.num_workers=0", "device=cpu", "data.batch_size=2", "data.eval_batch_size=2",
        "data.input_size=[32, 40]", "data.options.val_frames=1", "data.options.crop=false", "train.steps=2", "train.val_every=1",
        "train.checkpoint_every=0", "eval.hd=false"])
    # a tiny UNet with the method's heads: the protocol, not the network, is under test here
    # (U2Net's seven CE terms and six HOG heads: tests/harness/training/test_methods.py)
    cfg["model"] = {"name": "unet", "options": {"base_channels": 4, "depth": 2}}
    return cfg


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_endovis17_configs_train_on_videos_1_to_8_and_report_videos_9_and_10(name, ev17_root, tmp_path, capsys):
    import pandas as pd

    from mtseg_harness.runs import build_trainer, run_eval

    cfg = _cfg(name, ev17_root, tmp_path)
    tr = build_trainer(cfg)
    assert {r["video"] for r in tr.train_set.records} == {1, 2} and len(tr.train_set) == 2  # frame 0 of 1, 2
    assert [r["case_id"] for r in tr.val_set.records] == ["instrument_dataset_1/frame001",
                                                          "instrument_dataset_2/frame001"]
    tr.fit()
    assert tr.step == 2 and (tmp_path / "best.pt").is_file()
    val = pd.read_csv(tmp_path / "val_log.csv")
    assert tr.best == pytest.approx(val["miou"].max(), rel=1e-5)  # the checkpoint is kept on validation mIoU
    capsys.readouterr()
    _, summary, _ = run_eval(cfg, keep_examples=0)
    printed = capsys.readouterr().out
    assert summary["n_images"] == 4 and sorted(summary["by_video"]) == [9, 10]
    for v in (9, 10):
        assert f"  video {v}: miou {summary['by_video'][v]['miou']:.4f}  (paper not known to us)" in printed
    table = pd.read_csv(tmp_path / "eval_test" / "paper_comparison.csv")
    assert table["group"].tolist() == ["video 9", "video 10", "all"]
    assert table["ours"].iloc[2] == pytest.approx((summary["by_video"][9]["miou"] + summary["by_video"][10]["miou"]) / 2)
