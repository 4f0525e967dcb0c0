"""Heads: HOG dims of the HOG-MTL presets, head options, the context-ensemble receptive fields."""

from __future__ import annotations

import math

import pytest
import torch
from model_cases import single_thread  # noqa: F401  (autouse fixture)
from torch import nn

import mtseg_kernels
from mtseg_harness.models import ClassHead, ContextEnsemble, HOGHead, create_model

# HOG-MTL descriptor lengths on 128 x 64 images, by hand: blocks (rows, cols) x cells
# per block x orientations. 16-px cells: 8 x 4 cells -> 7 x 3 blocks; 12-px: 10 x 5 whole
# cells -> 9 x 4 blocks; 8-px: 16 x 8 -> 15 x 7.
PAPER_HOG_DIMS = {
    504: 7 * 3 * 2 * 2 * 6,
    864: 9 * 4 * 2 * 2 * 6,
    3780: 15 * 7 * 2 * 2 * 9,
    2520: 15 * 7 * 2 * 2 * 6,
    1680: 15 * 7 * 2 * 2 * 4,
    756: 7 * 3 * 2 * 2 * 9,
}


def test_hog_head_matches_every_hog_mtl_preset():
    assert set(mtseg_kernels.HOG_MTL_PRESETS) == set(PAPER_HOG_DIMS)
    for key, preset in mtseg_kernels.HOG_MTL_PRESETS.items():
        shape = mtseg_kernels.hog_output_shape(
            (128, 64), preset.orientations, preset.pixels_per_cell, preset.cells_per_block
        )
        dim = math.prod(shape)
        assert dim == key == PAPER_HOG_DIMS[key]
        for name in ("unet", "unet_bilinear"):
            model = create_model(name, 1, 2, heads={"hog": dim}, channels=(4, 8, 16))
            out = model(torch.randn(2, 1, 16, 12))
            assert [h.shape for h in out.hog] == [(2, dim)]
        u2 = create_model("u2net_lite", 1, 2, heads={"hog": {"dim": dim}})
        assert [h.shape for h in u2(torch.randn(1, 1, 40, 36)).hog] == [(1, dim)] * 6


def test_hog_head_layout_two_conv_relu_pool_stages_then_linear():
    head = HOGHead(32, 504, hidden=(16, 8), pool_size=(4, 2))
    kinds = [type(m) for m in head.features]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    convs = [m for m in head.features if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 16), (16, 8)]
    assert all(m.kernel_size == 2 for m in head.features if isinstance(m, nn.MaxPool2d))
    assert head.fc.in_features == 8 * 4 * 2 and head.fc.out_features == 504
    # input-size agnostic: 1x1 up to 256x256 feature maps
    for size in [(1, 1), (3, 5), (16, 16), (256, 256)]:
        assert head(torch.randn(2, 32, *size)).shape == (2, 504)


def test_u2net_hog_heads_sit_on_every_decoder_stage():
    model = create_model("u2net_lite", 3, 1, heads={"hog": True})
    # lite: all six side features have 64 channels (Qin et al., U2NETP)
    assert [h.features[0].in_channels for h in model.hog_heads] == [64] * 6
    full = create_model("u2net", 3, 1, heads={"hog": True})
    # full: side features of stages 1d..5d and 6 are 64, 64, 128, 256, 512, 512 wide
    assert [h.features[0].in_channels for h in full.hog_heads] == [64, 64, 128, 256, 512, 512]


def test_default_hog_unit_on_the_unet_bottleneck_is_the_authors_unit():
    """HOG-MTL's UNet unit (authors' code): conv 1024->512, ReLU, pool, conv 512->256, ReLU,
    pool, flatten 256 x 4 x 4 = 4096, linear to the HOG length."""
    model = create_model("unet", 3, 2, heads={"hog": 864})
    head = model.hog_head
    convs = [m for m in head.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1024, 512, (3, 3)), (512, 256, (3, 3))]
    assert (head.fc.in_features, head.fc.out_features) == (4096, 864)
    # on a 16 x 16 bottleneck (256 x 256 input) the adaptive pooling is the identity: the
    # head is exactly conv-relu-pool twice, flatten, linear
    torch.manual_seed(0)
    small = HOGHead(8, 864)  # widths 4, 2 by the same rule
    assert [c.out_channels for c in small.features if isinstance(c, nn.Conv2d)] == [4, 2]
    x = torch.randn(2, 8, 16, 16)
    h = torch.nn.functional.max_pool2d(torch.relu(small.features[0](x)), 2)
    h = torch.nn.functional.max_pool2d(torch.relu(small.features[3](h)), 2)
    torch.testing.assert_close(small(x), small.fc(h.flatten(1)))


def test_unet_hog_head_sits_on_the_bottleneck_of_both_variants():
    for name in ("unet", "unet_bilinear"):
        model = create_model(name, 1, 2, heads={"hog": True})
        assert model.hog_head.features[0].in_channels == 1024


def test_class_and_scene_heads_are_gap_plus_fc():
    tds = create_model("tdsnet", 3, 5, heads={"presence": True, "scene": 3})
    for head, out in ((tds.presence_head, 5), (tds.scene_head, 3)):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert [(l.in_features, l.out_features) for l in linears] == [(512, 256), (256, out)]
    cmu = create_model("cmunet", 1, 3, heads={"presence": True})
    linears = [m for m in cmu.presence_head.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 3)]
    # GAP: the logits depend on the spatial mean only
    head = ClassHead(4, 2)
    x = torch.randn(1, 4, 6, 6)
    shuffled = x.flatten(2)[..., torch.randperm(36)].view(1, 4, 6, 6)
    torch.testing.assert_close(head(x), head(shuffled))


def test_head_options():
    m = create_model("unet", 1, 4, heads={"presence": {"num_classes": 3, "hidden": 8}, "approx": 2, "scene": {"num_scenes": 5}},
                     channels=(4, 8))
    out = m(torch.randn(1, 1, 8, 6))
    assert out.presence.shape == (1, 3) and out.approx.shape == (1, 2, 8, 6) and out.scene.shape == (1, 5)
    assert [type(l) for l in m.presence_head.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    # False / None switch a head off
    out = create_model("unet", 1, 4, heads={"hog": False, "scene": None}, channels=(4, 8))(torch.randn(1, 1, 8, 6))
    assert out.hog == () and out.scene is None
    # approx with its own last two decoder stages
    m = create_model("unet", 1, 2, heads={"approx": {"blocks": 2}}, channels=(4, 8, 16))
    assert len(m.approx_decoder) == 2
    assert m(torch.randn(1, 1, 8, 12)).approx.shape == (1, 2, 8, 12)


@pytest.mark.parametrize(
    ("heads", "kwargs", "message"),
    [
        ({"depth": True}, {}, "unknown head 'depth'"),
        ({"hog": {"size": 3}}, {}, "no option"),
        ({"hog": 0}, {}, "hog dim must be an int >= 1"),
        ({"hog": {"hidden": (4,)}}, {}, "two channel counts"),
        ({"scene": True}, {}, "needs num_scenes"),
        ({"scene": 1}, {}, "num_scenes must be an int >= 2"),
        ({"approx": {"blocks": 3}}, {}, "approx blocks must be <= 2"),
        ({"hog": True}, {"spatial_dims": 3}, "needs spatial_dims=2"),
    ],
)
def test_bad_head_configurations(heads, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("unet", 1, 2, heads=heads, channels=(4, 8, 16), **kwargs)


def test_heads_must_be_a_dict():
    with pytest.raises(TypeError, match="heads must be a dict"):
        create_model("unet", 1, 2, heads=["hog"])
    with pytest.raises(TypeError, match="must be True/False, an int or a dict"):
        create_model("unet", 1, 2, heads={"presence": "yes"})


def test_u2net_approx_blocks():
    with pytest.raises(ValueError, match="blocks must be 1"):
        create_model("u2net_lite", 1, 2, heads={"approx": {"blocks": 2}})


# ------------------------------------------------------------------ context ensemble
# TDSNet's context-ensemble "rates": receptive fields (feature pixels per axis) of the input and
# the five stacked dilated convs (1 + 2 * cumulative dilation), summed by the module
PAPER_RECEPTIVE_FIELDS = [1, 3, 7, 15, 31, 63]


def _support_extent(t: torch.Tensor) -> tuple[int, int]:
    nz = (t.abs().sum(dim=(0, 1)) > 0).nonzero()
    return (int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1))


def _positive_weights(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.1)  # conv and norm scales positive: no cancellation
            else:
                p.zero_()


@pytest.mark.parametrize("norm", [None, "batch"])
def test_context_ensemble_effective_receptive_fields_by_impulse_response(norm):
    block = ContextEnsemble(2, norm=norm).eval()
    _positive_weights(block)
    x = torch.zeros(1, 2, 81, 81)
    x[0, 0, 40, 40] = 1.0
    with torch.no_grad():
        ys = block.branches(x)
        total = block(x)
    assert [_support_extent(y) for y in ys] == [(rf, rf) for rf in PAPER_RECEPTIVE_FIELDS]
    # the block's output is the sum of the input and the five dilated stages
    torch.testing.assert_close(total, sum(ys))
    assert _support_extent(total) == (63, 63)


def test_tdsnet_has_three_task_pair_context_stacks_with_the_paper_receptive_fields():
    model = create_model("tdsnet", 3, 2, heads={"presence": True}, channels=(4, 4, 8, 8, 8), branch_channels=4,
                         decoder_channels=4).eval()
    assert list(model.context) == ["seg_cls", "seg_scene", "cls_scene"]
    for name, block in model.context.items():
        assert isinstance(block, ContextEnsemble)
        # a stack: five 3x3 convs, dilations 1, 2, 4, 8, 16, each reading the previous one
        convs = [m for m in block.convs.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.kernel_size, c.dilation) for c in convs] == [((3, 3), (d, d)) for d in (1, 2, 4, 8, 16)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 4)] * 5
        _positive_weights(block)
        x = torch.zeros(1, 8, 70, 70)  # the 8-channel VGG top, projected to 4 channels first
        x[0, 3, 35, 35] = 1.0
        with torch.no_grad():
            extents = [_support_extent(y) for y in block.branches(x)]
        assert extents == [(rf, rf) for rf in PAPER_RECEPTIVE_FIELDS], name
    # the class-scene pair feeds only the class and scene heads: not built without them
    plain = create_model("tdsnet", 3, 2, channels=(4, 4, 8, 8, 8), branch_channels=4, decoder_channels=4)
    assert list(plain.context) == ["seg_cls", "seg_scene"]


def test_tdsnet_context_gradient_receptive_field():
    """The same fact seen from the other side: one output pixel's gradient covers 63x63."""
    block = ContextEnsemble(1, norm=None)
    _positive_weights(block)
    x = torch.ones(1, 1, 81, 81, requires_grad=True)  # every ReLU active
    block(x)[0, 0, 40, 40].backward()
    assert _support_extent(x.grad) == (63, 63)


# ------------------------------------------------------------------ typed heads
def test_heads_are_typed_specs_parsed_once_and_merged_head_by_head():
    from mtseg_harness.models import (DEFAULT_HOG_DIM, HEAD_NAMES, ApproxHeadSpec, Heads, HOGHeadSpec,
                                      PresenceHeadSpec, SceneHeadSpec)

    # the default HOG length is the op's own default target length
    assert DEFAULT_HOG_DIM == mtseg_kernels.hog_pseudo_label(torch.rand(1, 1, 32, 16)).shape[1] == 504
    assert HEAD_NAMES == ("hog", "presence", "scene", "approx")
    heads = Heads.parse({"hog": 3780, "presence": True, "scene": {"num_scenes": 4, "hidden": 8}, "approx": False})
    assert heads == Heads(hog=HOGHeadSpec(dim=3780), presence=PresenceHeadSpec(),
                          scene=SceneHeadSpec(num_scenes=4, hidden=8))
    assert heads.names() == ("hog", "presence", "scene") and "scene" in heads and "approx" not in heads
    # a method's heads, then a config's: the config replaces a head or switches it off
    method = Heads(hog=HOGHeadSpec(), approx=ApproxHeadSpec(num_classes=2))
    merged = method.updated({"hog": {"dim": 756}, "approx": False, "presence": 3})
    assert merged == Heads(hog=HOGHeadSpec(dim=756), presence=PresenceHeadSpec(num_classes=3))
    assert method.updated(Heads(scene=SceneHeadSpec(2))) == Heads(hog=HOGHeadSpec(), scene=SceneHeadSpec(2),
                                                                  approx=ApproxHeadSpec(num_classes=2))


def test_presence_hidden_default_is_the_architectures_and_none_means_one_linear():
    from mtseg_harness.models import Heads, PresenceHeadSpec

    tds = create_model("tdsnet", 3, 5, heads=Heads(presence=PresenceHeadSpec()))
    assert tds.head_config.presence == PresenceHeadSpec(num_classes=5, hidden=256)
    one = create_model("tdsnet", 3, 5, heads={"presence": {"hidden": None}})
    assert [type(m) for m in one.presence_head.modules()][1:] == [nn.Linear]
    unet = create_model("unet", 1, 4, heads=Heads(presence=PresenceHeadSpec()), channels=(4, 8))
    assert unet.head_config.presence == PresenceHeadSpec(num_classes=4, hidden=None)
