"""One tester over every registered model and head combination: structure, shapes, gradients."""

from __future__ import annotations

import pytest
import torch
from model_cases import CASES, Case, heads_for, single_thread  # noqa: F401  (autouse fixture)

from mtseg_harness.models import ModelOutput, create_model, list_models

NUM_CLASSES = 3
IN_CHANNELS = 2
HEAD_SETS = ("none", "hog", "presence", "scene", "approx", "all")
FIELDS = ("seg", "side", "hog", "presence", "scene", "approx")


def _build(case: Case, heads: dict, **extra):
    return create_model(
        case.name, IN_CHANNELS, NUM_CLASSES, heads=heads, spatial_dims=case.spatial_dims, **{**case.kwargs, **extra}
    )


def _combos():
    for case in CASES:
        for which in HEAD_SETS:
            if heads_for(case.spatial_dims, which) is None:
                continue  # hog is a 2D descriptor
            for batch in (1, 2) if which in ("none", "all") else (2,):
                yield pytest.param(case, which, batch, id=f"{case.id}-{which}-b{batch}")


def test_registry_covers_every_architecture_of_the_issue():
    names = set(list_models())
    assert {"unet", "unet_bilinear", "u2net", "u2net_lite", "tdsnet", "unet3d_aniso", "cmunet"} <= names
    # every registered name is exercised by the shared tester (u2net full: test_param_counts)
    assert names - {"u2net"} <= {c.name for c in CASES}


@pytest.mark.parametrize(("case", "which", "batch"), list(_combos()))
def test_outputs_and_gradients(case: Case, which: str, batch: int):
    heads = heads_for(case.spatial_dims, which)
    torch.manual_seed(0)
    model = _build(case, heads).train()
    x = torch.randn(batch, IN_CHANNELS, *case.size)
    out = model(x)

    # one fixed structure, whatever the heads
    assert type(out) is ModelOutput
    assert out._fields == FIELDS
    seg_shape = (batch, NUM_CLASSES, *case.size)
    assert out.seg.shape == seg_shape
    assert isinstance(out.side, tuple) and isinstance(out.hog, tuple)
    n_side = 6 if case.name.startswith("u2net") else 0
    assert len(out.side) == n_side
    assert all(s.shape == seg_shape for s in out.side)
    if "hog" in heads:
        assert len(out.hog) == (6 if case.name.startswith("u2net") else 1)
        assert all(h.shape == (batch, 504) for h in out.hog)
    else:
        assert out.hog == ()
    assert (out.presence is None) == ("presence" not in heads)
    if out.presence is not None:
        assert out.presence.shape == (batch, NUM_CLASSES)
    assert (out.scene is None) == ("scene" not in heads)
    if out.scene is not None:
        assert out.scene.shape == (batch, 3)
    assert (out.approx is None) == ("approx" not in heads)
    if out.approx is not None:
        assert out.approx.shape == seg_shape

    # backward of a random projection of every output reaches every parameter
    gen = torch.Generator().manual_seed(1)
    leaves = [out.seg, *out.side, *out.hog] + [t for t in (out.presence, out.scene, out.approx) if t is not None]
    total = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in leaves)
    total.backward()
    head_words = ("hog", "presence", "scene", "approx")
    seen_heads = set()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        for word in head_words:
            if name.split(".")[0].startswith(word + "_"):
                seen_heads.add(word)
                if p.dim() > 1:  # weights of head layers must actually receive signal
                    assert p.grad.abs().sum() > 0, f"zero gradient in head weight {name}"
    assert seen_heads == set(heads), f"head parameters found for {seen_heads}, configured {set(heads)}"


@pytest.mark.parametrize(
    ("name", "kwargs", "sizes"),
    [
        ("u2net_lite", {}, [(33, 47), (20, 29), (64, 40)]),
        ("tdsnet", CASES[3].kwargs, [(37, 45), (24, 31), (9, 70)]),
    ],
)
def test_any_input_size_where_the_architecture_allows(name, kwargs, sizes):
    model = create_model(name, 1, 2, heads={"hog": True}, **kwargs).eval()
    with torch.no_grad():
        for size in sizes:
            out = model(torch.randn(1, 1, *size))
            assert out.seg.shape == (1, 2, *size)
            assert all(s.shape == (1, 2, *size) for s in out.side)
            assert all(h.shape == (1, 504) for h in out.hog)


@pytest.mark.parametrize(
    ("name", "spatial_dims", "kwargs", "good", "bad", "needed"),
    [
        # stride 4 (two poolings): 18 x 25 needs 20 x 28
        ("unet", 2, {"channels": (4, 8, 16)}, (12, 20), (18, 25), "(20, 28)"),
        ("unet_bilinear", 2, {"channels": (4, 8, 16)}, (28, 8), (18, 25), "(20, 28)"),
        # CMU-Net default: four poolings, stride 16: 40 x 50 needs 48 x 64
        ("cmunet", 2, {}, (48, 32), (40, 50), "(48, 64)"),
        # anisotropic: in-plane stride 4, depth not pooled: any depth
        ("unet3d_aniso", 3, {"channels": (4, 8, 16)}, (7, 8, 12), (7, 10, 12), "(7, 12, 12)"),
    ],
)
def test_strided_models_reject_sizes_they_cannot_take(name, spatial_dims, kwargs, good, bad, needed):
    model = create_model(name, 1, 2, spatial_dims=spatial_dims, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *good)).seg.shape == (1, 2, *good)
        with pytest.raises(ValueError, match="multiple of") as info:
            model(torch.randn(1, 1, *bad))
    assert needed in str(info.value)


def test_determinism_with_a_seed():
    for case in CASES:
        torch.manual_seed(123)
        a = _build(case, heads_for(case.spatial_dims, "all")).eval()
        torch.manual_seed(123)
        b = _build(case, heads_for(case.spatial_dims, "all")).eval()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), case.id
        x = torch.randn(2, IN_CHANNELS, *case.size)
        with torch.no_grad():
            oa, ob = a(x), b(x)
        for fa, fb in zip(oa, ob):
            fa = fa if isinstance(fa, tuple) else (fa,)
            fb = fb if isinstance(fb, tuple) else (fb,)
            for ta, tb in zip(fa, fb):
                assert (ta is None and tb is None) or torch.equal(ta, tb), case.id


def test_registry_specs_state_the_heads_each_model_takes():
    from mtseg_harness.models import HEAD_NAMES, get_model_spec

    values = {"hog": True, "presence": True, "scene": 2, "approx": True}
    for case in CASES:
        spec = get_model_spec(case.name)
        assert case.spatial_dims in spec.spatial_dims
        for head in HEAD_NAMES:
            takes = head in spec.heads and not (head == "hog" and case.spatial_dims != 2)
            if takes:
                _build(case, {head: values[head]})
            else:
                with pytest.raises(ValueError):
                    _build(case, {head: values[head]})


def test_package_docstring_example():
    import doctest

    import mtseg_harness.models as models

    result = doctest.testmod(models, verbose=False)
    assert result.attempted > 0 and result.failed == 0
