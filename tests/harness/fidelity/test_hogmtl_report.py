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
