"""HOG-MTL's loss against a hand-computed case, and the HOG length followed by target and head."""

import math
from pathlib import Path

import pytest
import torch

from mtseg_harness.methods import create_method  # noqa: E402
from mtseg_harness.models import ModelOutput  # noqa: E402


def _out(seg, hog, side=()):
    return ModelOutput(seg=seg, side=side, hog=hog, presence=None, scene=None, approx=None)


def test_hog_mtl_loss_by_hand():
    # one image of 1 x 3 pixels, two classes; the third pixel is ignored (255)
    seg = torch.tensor([[[[2.0, 0.0, 9.0]], [[0.0, 1.0, -9.0]]]])          # (1, 2, 1, 3)
    mask = torch.tensor([[[0, 0, 255]]])
    m = create_method("hog_mtl", 2, alpha=0.3, beta=4.0)
    batch = {"mask": mask, "hog": torch.full((1, 504), 0.25)}
    loss, logs = m.loss(_out(seg, (torch.full((1, 504), 0.5),)), batch, 0, 1)
    ce = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2     # softmax CE of the two valid pixels
    mse = (0.5 - 0.25) ** 2
    assert loss.item() == pytest.approx(0.3 * ce + 4.0 * mse, rel=1e-6)
    assert logs["hog"] == pytest.approx(mse) and logs["seg"] == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("dim, cells", [(504, 16), (864, 12), (2520, 8)])
def test_hog_length_follows_the_preset_in_target_and_head(dim, cells):
    import skimage.feature
    import torch.nn.functional as F

    m = create_method("hog_mtl", 2, dim=dim)
    assert m.heads().hog.dim == dim
    torch.manual_seed(0)
    image = torch.rand(2, 1, 96, 80)
    hog = m.targets({"image": image, "mask": torch.zeros(2, 96, 80, dtype=torch.long)})["hog"]
    assert hog.shape == (2, dim)
    # independent check of the preset's cells: scikit-image on the 128 x 64 resize the op uses
    small = F.interpolate(image, size=(128, 64), mode="bilinear", align_corners=False, antialias=False)
    ref = skimage.feature.hog(small[0, 0].double().numpy(), orientations=6, pixels_per_cell=(cells, cells),
                              cells_per_block=(2, 2), block_norm="L2-Hys")
    assert ref.size == dim


def test_a_head_of_another_length_is_a_clear_error():
    m = create_method("hog_mtl", 2, dim=864)
    batch = {"mask": torch.zeros(1, 2, 2, dtype=torch.long), "hog": torch.zeros(1, 864)}
    with pytest.raises(ValueError, match="predicts 504 values but method.dim is 864"):
        m.loss(_out(torch.zeros(1, 2, 2, 2), (torch.zeros(1, 504),)), batch, 0, 1)


def test_model_built_for_the_864_preset_trains_a_step(tmp_path):
    from mtseg_harness.runs import build_trainer, load_config

    sample = Path(__file__).resolve().parents[3] / "harness" / "assets" / "hc18_sample"
    cfg = load_config(None, [], base={
        "device": "cpu", "method": {"name": "hog_mtl", "dim": 864},
        "data": {"name": "hc18", "root": str(sample), "batch_size": 2, "input_size": [32, 48], "num_workers": 0},
        "model": {"name": "unet", "options": {"base_channels": 4, "depth": 2}},
        "train": {"steps": 1, "val_every": 0, "checkpoint_every": 0, "progress": False, "tensorboard": False,
                  "out_dir": str(tmp_path)}})
    tr = build_trainer(cfg)
    tr.fit()
    assert tr.step == 1
    out = tr.model(torch.zeros(1, 1, 32, 48))
    assert [h.shape[-1] for h in out.hog] == [864]
