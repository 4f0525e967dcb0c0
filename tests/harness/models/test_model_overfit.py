"""30 Adam steps on one real HC18 ultrasound image: every architecture must overfit it.

The loss (segmentation, plus the auxiliary head's loss where one is on) must fall at
least five-fold, with and without the auxiliary head of the method that uses it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_cases import single_thread  # noqa: F401  (autouse fixture)

import mtseg_kernels
from mtseg_harness.models import create_model

SIZE = (32, 48)  # 540 x 800 images shrunk by ~16.7; aspect kept within 2%
STEPS = 30
LR = 1e-2

# architecture -> (kwargs, the auxiliary heads its paper attaches)
ARCHS = {
    "unet": ({"channels": (8, 16, 32, 64)}, {"hog": True}),  # HOG-MTL on UNet
    "unet_bilinear": ({"channels": (8, 16, 32, 64)}, {"hog": True}),
    "u2net_lite": ({}, {"hog": True}),  # HOG-MTL on U2Net: six HOG heads
    "tdsnet": ({"channels": (16, 16, 32, 32, 32), "branch_channels": 16, "decoder_channels": 16},
               {"presence": True, "scene": 2}),  # TDSNet class + scene heads
    "cmunet": ({}, {"presence": True}),  # CMU-Net's encoder classification head
    "unet3d_aniso": ({"channels": (8, 16, 32, 64)}, {"approx": True}),  # Ke et al.'s approximation output
}


@pytest.fixture(scope="module")
def hc18_sample(shared_data):
    from PIL import Image
    from scipy import ndimage

    folder = shared_data / "hc18" / "training_set"
    image_path, ann_path = folder / "010_HC.png", folder / "010_HC_Annotation.png"
    if not image_path.is_file() or not ann_path.is_file():
        pytest.skip(f"HC18 sample not found in {folder}")
    image = np.asarray(Image.open(image_path).convert("L"), dtype=np.float32) / 255.0
    outline = np.asarray(Image.open(ann_path).convert("L")) > 127
    mask = ndimage.binary_fill_holes(outline)  # the annotation is the ellipse outline: fill it
    assert 0.05 < mask.mean() < 0.5, "the filled head should cover a fair part of the image"
    x = F.interpolate(torch.from_numpy(image)[None, None], size=SIZE, mode="area")
    y = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=SIZE, mode="area")[:, 0] > 0.5
    weak = -F.max_pool2d(-y[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0.5  # eroded: a rough inner region
    return x, y.long(), weak.long()


def _loss(out, y, weak, targets) -> torch.Tensor:
    loss = F.cross_entropy(out.seg, y) + sum(F.cross_entropy(s, y) for s in out.side)
    loss = loss + sum(F.mse_loss(h, targets["hog"]) for h in out.hog)
    if out.presence is not None:
        loss = loss + F.binary_cross_entropy_with_logits(out.presence, targets["presence"])
    if out.scene is not None:
        loss = loss + F.cross_entropy(out.scene, targets["scene"])
    if out.approx is not None:
        loss = loss + F.cross_entropy(out.approx, weak)
    return loss


@pytest.mark.parametrize("with_aux", [False, True], ids=["seg-only", "with-aux"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_overfits_one_hc18_image(hc18_sample, name, with_aux):
    x, y, weak = hc18_sample
    kwargs, aux = ARCHS[name]
    targets = {
        "hog": mtseg_kernels.hog_pseudo_label(x, dim=504),  # (1, 504) float, HOG-MTL preset
        "presence": torch.tensor([[1.0, 1.0]]),  # background and head both present
        "scene": torch.tensor([0]),
    }
    if name == "unet3d_aniso":  # a 4-modality volume of 4 identical slices (depth first)
        x = x[:, :, None].expand(-1, 4, 4, -1, -1).contiguous()
        y, weak = y[:, None].expand(-1, 4, -1, -1), weak[:, None].expand(-1, 4, -1, -1)
    torch.manual_seed(0)
    model = create_model(name, x.shape[1], 2, heads=aux if with_aux else None, spatial_dims=x.dim() - 2, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model(x), y, weak, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] * 5 <= losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {STEPS} steps"
