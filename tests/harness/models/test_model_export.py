"""torch.compile(fullgraph=True) and torch.export (the jit-free export) of every model's forward."""

from __future__ import annotations

import pytest
import torch
from model_cases import CASES, Case, heads_for, single_thread  # noqa: F401  (autouse fixture)

from mtseg_harness.models import ModelOutput, create_model

# Every case but 3D U2Net-lite: its forward is the same Python as in 2D (only the conv
# classes differ) and tracing its ~90 RSU convs twice more costs ~20 s on a 2-core machine.
EXPORT_CASES = [c for c in CASES if c.id != "u2net_lite-3d"]
EXPORT_IDS = [c.id for c in EXPORT_CASES]


def _model_and_input(case: Case):
    torch.manual_seed(0)
    model = create_model(case.name, 2, 3, heads=heads_for(case.spatial_dims, "all"),
                         spatial_dims=case.spatial_dims, **case.kwargs).eval()
    return model, torch.randn(2, 2, *case.size)


def _assert_same(a: ModelOutput, b: ModelOutput, atol: float = 1e-5):
    assert type(a) is ModelOutput and type(b) is ModelOutput
    for fa, fb in zip(a, b):
        fa = fa if isinstance(fa, tuple) else (fa,)
        fb = fb if isinstance(fb, tuple) else (fb,)
        assert len(fa) == len(fb)
        for ta, tb in zip(fa, fb):
            if ta is None or tb is None:
                assert ta is None and tb is None
            else:
                torch.testing.assert_close(ta, tb, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=EXPORT_IDS)
def test_export(case: Case):
    model, x = _model_and_input(case)
    with torch.no_grad():
        eager = model(x)
    program = torch.export.export(model, (x,))
    _assert_same(program.module()(x), eager)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=EXPORT_IDS)
def test_compile_fullgraph_traces_without_breaks(case: Case):
    """Dynamo captures the whole forward in one graph (fullgraph=True raises on a break).

    The 'eager' backend runs the captured graph as is: the check is the capture, which is
    what every backend starts from; inductor code generation is tested once below.
    """
    model, x = _model_and_input(case)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        _assert_same(compiled(x), model(x))


@pytest.mark.slow
def test_compile_inductor_equals_eager():
    """Inductor (C++ code generation on CPU) on a tiny UNet with every 2D head.

    About 25 s on a 2-core machine with a cold inductor cache (C++ compilation), ~5 s warm.
    """
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, heads={"hog": True, "presence": True, "scene": 3, "approx": True},
                         channels=(4, 8)).eval()
    x = torch.randn(2, 1, 16, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _assert_same(compiled(x), model(x), atol=1e-4)


def test_compiled_training_step_matches_eager_gradients():
    """Training mode (batch-norm batch statistics) through AOTAutograd: same loss, same grads."""
    heads = {"hog": True, "presence": True, "scene": 2, "approx": True}
    torch.manual_seed(0)
    eager = create_model("unet", 1, 2, heads=heads, channels=(4, 8)).train()
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, heads=heads, channels=(4, 8)).train()
    x = torch.randn(2, 1, 8, 12)

    def loss_of(out: ModelOutput) -> torch.Tensor:
        return sum((t * t).mean() for t in [out.seg, *out.hog, out.presence, out.scene, out.approx])

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = loss_of(compiled(x))
    loss_e = loss_of(eager(x))
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    for (name, pc), pe in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
