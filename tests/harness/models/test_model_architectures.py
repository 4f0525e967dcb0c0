"""Architecture facts from the papers: parameter counts, widths, kernels, pooling; bad input."""

from __future__ import annotations

import pytest
import torch
from model_cases import single_thread  # noqa: F401  (autouse fixture)
from torch import nn

from mtseg_harness.models import anisotropic_pool_schedule, create_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ parameter counts
def test_u2net_full_parameter_count_and_one_forward():
    model = create_model("u2net", 3, 1)  # the published setting: RGB in, one saliency map out
    assert abs(n_params(model) - 44.0e6) <= 0.02 * 44.0e6  # Qin et al.: 44.0M (176.3 MB)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 20, 28))
    assert out.seg.shape == (1, 1, 20, 28) and len(out.side) == 6


def test_u2net_lite_parameter_count():
    model = create_model("u2net_lite", 3, 1)
    assert abs(n_params(model) - 1.13e6) <= 0.02 * 1.13e6  # Qin et al.: U2-Net† 1.13M (4.7 MB)


def test_unet_parameter_count():
    # Ronneberger UNet with 'same' padding and batch norm: the commonly reported ~31.0M
    for name in ("unet", "unet_bilinear"):
        count = n_params(create_model(name, 3, 2))
        assert 28.0e6 <= count <= 31.7e6, (name, count)
    assert abs(n_params(create_model("unet", 3, 2)) - 31.0e6) <= 0.02 * 31.0e6


def test_tdsnet_encoder_is_vgg16():
    model = create_model("tdsnet", 3, 2)
    # VGG16's 13 conv layers (Simonyan & Zisserman, configuration D): 14,714,688 parameters
    assert n_params(model.features) == 14_714_688
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 3 + [512] * 3
    # torchvision's vgg16().features indices: convs at these positions, pools at 4, 9, 16, 23, 30
    idx = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    assert idx == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert len(model.features) == 31


def test_tdsnet_loads_local_vgg16_weights(tmp_path):
    torch.manual_seed(0)
    donor = create_model("tdsnet", 3, 2)
    path = tmp_path / "vgg16.pth"
    # torchvision layout: "features.N.weight", plus classifier keys that are ignored
    state = {f"features.{k}": v for k, v in donor.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    torch.manual_seed(1)
    model = create_model("tdsnet", 3, 2, encoder_weights=str(path))
    for k, v in donor.features.state_dict().items():
        assert torch.equal(model.features.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks VGG16 encoder weights"):
        create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="has shape"):
        create_model("tdsnet", 1, 2, encoder_weights=str(path))  # 1-channel input vs RGB weights


def test_cmunet_layout():
    model = create_model("cmunet", 1, 3, heads={"presence": True})
    enc_convs = [[m for m in block.modules() if isinstance(m, nn.Conv2d)] for block in model.encoder]
    assert [[c.out_channels for c in convs] for convs in enc_convs] == [[16, 16], [32, 32], [64, 64], [128, 128], [256, 256]]
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.2 for a in acts)
    assert any(isinstance(m, nn.InstanceNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.out.kernel_size == (1, 1) and model.out.out_channels == 3
    dec_convs = [[m for m in st.modules() if isinstance(m, nn.Conv2d)] for st in model.decoder]
    assert [convs[-1].out_channels for convs in dec_convs] == [128, 64, 32, 16]  # mirrored


def test_anisotropic_unet_kernels_and_pooling_for_brats_crops():
    model = create_model("unet3d_aniso", 4, 4, channels=(4, 8, 16, 32, 64)).eval()
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv3d)}
    assert kernels == {(1, 3, 3), (3, 1, 1), (1, 1, 1)}  # in-plane, through-plane, 1x1x1 output
    pools = [m.kernel_size for m in model.modules() if isinstance(m, nn.MaxPool3d)]
    assert pools == [(1, 2, 2)] * 4  # 19 slices: never pooled through-plane
    with torch.no_grad():
        out = model(torch.randn(1, 4, 19, 144, 144))  # a BraTS crop, depth first
    assert out.seg.shape == (1, 4, 19, 144, 144)


def test_anisotropic_pool_schedule():
    assert anisotropic_pool_schedule(4, 19) == (False, False, False, False)
    assert anisotropic_pool_schedule(4, None) == (False,) * 4
    assert anisotropic_pool_schedule(4, 32) == (True, True, True, False)  # 32 -> 16 -> 8 -> 4
    model = create_model("unet3d_aniso", 1, 2, channels=(2, 4, 8, 16, 32), input_depth=32)
    pools = [m.kernel_size for m in model.modules() if isinstance(m, nn.MaxPool3d)]
    assert pools == [(2, 2, 2)] * 3 + [(1, 2, 2)]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 16)).seg.shape == (1, 2, 16, 16, 16)
        with pytest.raises(ValueError, match=r"\(24, 16, 16\)"):  # depth must be a multiple of 8
            model(torch.randn(1, 1, 20, 16, 16))


def test_unet_upsampling_variants():
    t = create_model("unet", 1, 2, channels=(4, 8, 16))
    b = create_model("unet_bilinear", 1, 2, channels=(4, 8, 16))
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in t.modules()) == 2
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in b.modules()) == 0
    # same bottleneck width in both: the HOG head fits either
    assert t.encoder[-1][-1][0].out_channels == b.encoder[-1][-1][0].out_channels == 16


# ------------------------------------------------------------------ bad input
def test_unknown_model_lists_the_registered_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*u2net"):
        create_model("resnet", 3, 2)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("tdsnet", {"spatial_dims": 3}, "supports spatial_dims"),
        ("unet3d_aniso", {"spatial_dims": 2}, "supports spatial_dims"),
        ("unet", {"spatial_dims": 4}, "supports spatial_dims"),
        ("unet", {"upsampling": "nearest"}, "upsampling must be"),
        ("u2net", {"config": "huge"}, "config must be one of"),
        ("unet", {"norm": "layer", "channels": (4, 8)}, "norm must be one of"),
        ("unet", {"channels": (4,)}, "two or more"),
        ("tdsnet", {"channels": (4, 8)}, "5 VGG block widths"),
    ],
)
def test_bad_model_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 3, 2, **kwargs)


def test_bad_channel_and_class_counts():
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        create_model("unet", 0, 2)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        create_model("u2net_lite", 1, 0)


def test_bad_inputs_at_forward():
    model = create_model("unet", 2, 3, channels=(4, 8)).eval()
    with pytest.raises(ValueError, match=r"expected a 4-d input \(B, C, H, W\)"):
        model(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="expected 2 input channels, got 3"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"multiple of \(2, 2\).*\(8, 10\)"):
        model(torch.randn(1, 2, 7, 9))
    model3d = create_model("u2net_lite", 1, 2, spatial_dims=3).eval()
    with pytest.raises(ValueError, match=r"5-d input \(B, C, D, H, W\)"):
        model3d(torch.randn(1, 1, 8, 8))
    tds = create_model("tdsnet", 1, 2, channels=(4, 4, 8, 8, 8), branch_channels=4, decoder_channels=4).eval()
    with pytest.raises(ValueError, match=r"at least \(8, 8\)"):
        tds(torch.randn(1, 1, 4, 16))


def test_unet_depth_and_width():
    model = create_model("unet", 1, 2, depth=2, base_channels=4)
    assert model.channels == (4, 8, 16) and model.size_multiple == (4, 4)
    assert create_model("unet", 1, 2, depth=5, base_channels=2).channels == (2, 4, 8, 16, 32, 64)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        create_model("unet", 1, 2, depth=0)
