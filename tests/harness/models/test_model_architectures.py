"""Architecture facts from the papers: parameter counts, widths, kernels, pooling; bad input."""

from __future__ import annotations

import pytest
import torch
from model_cases import single_thread  # noqa: F401  (autouse fixture)
from torch import nn

from mtseg_harness.models import anisotropic_pool_schedule, create_model
from mtseg_harness.models.tdsnet import ASPP


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


# torchvision's vgg16() state dict, written out by hand (torchvision is not a dependency):
# features.N for the 13 convs (index, out, in), then the classifier (ignored by TDSNet).
TORCHVISION_VGG16_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
                           (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512),
                           (26, 512, 512), (28, 512, 512)]


def _torchvision_vgg16_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, out, inp in TORCHVISION_VGG16_CONVS:
        state[f"features.{idx}.weight"] = torch.randn(out, inp, 3, 3, generator=g)
        state[f"features.{idx}.bias"] = torch.randn(out, generator=g)
    # real files hold (4096, 25088), (4096, 4096), (1000, 4096) here; small stand-ins, never read
    for idx in (0, 3, 6):
        state[f"classifier.{idx}.weight"] = torch.zeros(2, 2)
        state[f"classifier.{idx}.bias"] = torch.zeros(2)
    return state


def test_tdsnet_loads_a_torchvision_vgg16_state_dict(tmp_path, caplog):
    state = _torchvision_vgg16_state(0)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    with caplog.at_level("INFO", logger="mtseg_harness.models"):
        model = create_model("tdsnet", 3, 2, encoder_weights=str(path))
    assert "loaded from" in caplog.text and "from scratch" not in caplog.text
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for conv, (idx, _, _) in zip(convs, TORCHVISION_VGG16_CONVS, strict=True):
        assert torch.equal(conv.weight, state[f"features.{idx}.weight"])
        assert torch.equal(conv.bias, state[f"features.{idx}.bias"])
    # the same without the "features." prefix, and inside a {"state_dict": ...} wrapper
    bare = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    torch.save({"state_dict": bare}, tmp_path / "wrapped.pth")
    model = create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "wrapped.pth"))
    assert torch.equal(model.features[28].weight, state["features.28.weight"])


def test_tdsnet_says_when_it_trains_from_scratch(caplog):
    with caplog.at_level("WARNING", logger="mtseg_harness.models"):
        create_model("tdsnet", 3, 2, channels=(4, 4, 8, 8, 8), branch_channels=4, decoder_channels=4)
    assert "trains from scratch" in caplog.text and "encoder_weights" in caplog.text


def test_tdsnet_bad_encoder_weights(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16_state(1), path)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks VGG16 encoder weights"):
        create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match=r"has shape \(64, 3, 3, 3\), the model needs \(64, 1, 3, 3\)"):
        create_model("tdsnet", 1, 2, encoder_weights=str(path))  # 1-channel input vs RGB weights
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        create_model("tdsnet", 3, 2, encoder_weights=str(tmp_path / "list.pth"))


def _tiny_tdsnet(**kw):
    torch.manual_seed(0)
    return create_model("tdsnet", 3, 4, channels=(4, 4, 8, 8, 8), branch_channels=4, decoder_channels=6, **kw).eval()


def test_tdsnet_segmentation_has_no_encoder_skip_connection():
    """The segmentation is a function of the encoder's last output alone: replace that output
    by a fixed tensor and two different images give the same logits (a skip from an earlier
    encoder stage would let the image through)."""
    model = _tiny_tdsnet(heads={"presence": True, "scene": 2})
    fixed = torch.randn(1, 8, 5, 6)
    handle = model.features.register_forward_hook(lambda module, inputs, output: fixed)
    with torch.no_grad():
        a, b = model(torch.randn(1, 3, 40, 48)), model(torch.randn(1, 3, 40, 48))
    handle.remove()
    for fa, fb in ((a.seg, b.seg), (a.presence, b.presence), (a.scene, b.scene)):
        torch.testing.assert_close(fa, fb)
    with torch.no_grad():  # without the hook the images do matter
        assert not torch.allclose(model(torch.randn(1, 3, 40, 48)).seg, a.seg)


def test_tdsnet_task_heads_read_their_two_task_pairs():
    """Segmentation reads seg_cls + seg_scene, the class head seg_cls + cls_scene, the scene
    head seg_scene + cls_scene: zeroing one pair's module output changes exactly the tasks
    that pair belongs to."""
    model = _tiny_tdsnet(heads={"presence": True, "scene": 2})
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        ref = model(x)
    depends = {"seg_cls": {"seg", "presence"}, "seg_scene": {"seg", "scene"}, "cls_scene": {"presence", "scene"}}
    for pair, tasks in depends.items():
        handle = model.context[pair].register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
        with torch.no_grad():
            out = model(x)
        handle.remove()
        changed = {t for t in ("seg", "presence", "scene") if not torch.allclose(getattr(out, t), getattr(ref, t))}
        assert changed == tasks, pair


def test_tdsnet_decoder_is_aspp_then_conv_then_classifier():
    model = _tiny_tdsnet()
    aspp = model.decoder[0]
    assert isinstance(aspp, ASPP) and aspp.rates == (12, 24, 36)
    convs = [m for m in aspp.branches.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.dilation, c.in_channels) for c in convs] == \
        [((1, 1), (1, 1), 8), ((3, 3), (12, 12), 8), ((3, 3), (24, 24), 8), ((3, 3), (36, 36), 8)]
    assert aspp.project[0].in_channels == 5 * 6  # four branches + image pooling, concatenated
    assert model.classifier.kernel_size == (1, 1) and model.classifier.out_channels == 4
    # logits at stride 8, bilinear to the input size
    assert model(torch.randn(1, 3, 37, 45)).seg.shape == (1, 4, 37, 45)


def test_aspp_branch_reach_and_image_pooling():
    torch.manual_seed(0)
    aspp = ASPP(1, 1, rates=(3,), norm=None).eval()
    with torch.no_grad():
        for p in aspp.parameters():
            p.copy_(torch.rand_like(p) + 0.1 if p.dim() > 1 else torch.zeros_like(p))
        pool_conv = aspp.pool[1]
        pool_conv.weight.zero_()
        x = torch.zeros(1, 1, 21, 21)
        x[0, 0, 10, 10] = 1.0
        y = aspp(x)
    nz = (y[0, 0] > 0).nonzero()
    # the widest branch, a 3x3 conv with dilation 3, reaches 3 pixels each way: 7 x 7
    assert (int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)) == (7, 7)
    # image pooling alone: a constant map equal to relu(w * mean + b), projected
    with torch.no_grad():
        for branch in aspp.branches:
            branch[0].weight.zero_()
        pool_conv.weight.fill_(2.0)
        pool_conv.bias.fill_(0.5)
        x = torch.rand(1, 1, 9, 11)
        y = aspp(x)
        pooled = max(0.0, 2.0 * float(x.mean()) + 0.5)
        w = aspp.project[0].weight.view(-1)
        expected = max(0.0, float(w[-1]) * pooled + float(aspp.project[0].bias))
    torch.testing.assert_close(y, torch.full_like(y, expected))


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
