"""Sliding-window inference against a numpy loop over hand-listed windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtseg_harness.evaluation import SlidingWindow, predict_batch, window_starts
from mtseg_harness.models import ModelOutput


class Positional(torch.nn.Module):
    """seg[k] = input + (k + 1) * (position inside the window along the last axis): a window-dependent output."""

    def forward(self, x):
        pos = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
        seg = torch.cat([x[:, :1] + (k + 1) * pos for k in range(2)], 1)
        return ModelOutput(seg=seg, side=(), hog=(), presence=x.mean((2, 3, 4))[:, :1], scene=None, approx=None)


def _oracle(x, starts_per_axis, window):
    """Mean of the windows' outputs per voxel, by numpy loops."""
    b, _, d, h, w = x.shape
    acc = np.zeros((b, 2, d, h, w))
    cnt = np.zeros((d, h, w))
    for z in starts_per_axis[0]:
        for y in starts_per_axis[1]:
            for s in starts_per_axis[2]:
                win = x[:, :1, z:z + window[0], y:y + window[1], s:s + window[2]]
                pos = np.arange(window[2])
                for k in range(2):
                    acc[:, k, z:z + window[0], y:y + window[1], s:s + window[2]] += win[:, 0] + (k + 1) * pos
                cnt[z:z + window[0], y:y + window[1], s:s + window[2]] += 1
    return acc / cnt


def test_window_starts_by_hand():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(7, 4, 0.5) == [0, 2, 3]      # the last window flush with the end
    assert window_starts(144, 144, 0.5) == [0]
    assert window_starts(155, 19, 0.0) == [0, 19, 38, 57, 76, 95, 114, 133, 136]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)


def test_sliding_window_mean_matches_a_numpy_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 3, 5, 7, generator=g, dtype=torch.float64)
    out = SlidingWindow(Positional(), (2, 5, 4), overlap=0.5)(x)
    # D: size 3, window 2, step 1 -> 0, 1; H: window = size -> 0; W: size 7, window 4, step 2 -> 0, 2, 3
    expected = _oracle(x.numpy(), ([0, 1], [0], [0, 2, 3]), (2, 5, 4))
    np.testing.assert_allclose(out.seg.double().numpy(), expected, rtol=1e-6)
    assert out.presence is None and out.seg.shape == (2, 2, 3, 5, 7)


def test_sliding_window_pads_an_axis_shorter_than_the_window():
    x = torch.rand(1, 1, 2, 4, 6, dtype=torch.float64)
    out = SlidingWindow(Positional(), (3, 4, 6), overlap=0.25)(x)
    # D padded 2 -> 3 with zeros, one window everywhere: the model's output on the padded input, cropped
    padded = np.zeros((1, 1, 3, 4, 6))
    padded[:, :, :2] = x.numpy()
    expected = _oracle(padded, ([0], [0], [0]), (3, 4, 6))[:, :, :2]
    np.testing.assert_allclose(out.seg.double().numpy(), expected, rtol=1e-6)


def test_predict_batch_with_a_window_equals_whole_input_for_a_pointwise_model():
    conv = torch.nn.Conv3d(4, 3, 1).double()

    class Pointwise(torch.nn.Module):
        def forward(self, x):
            return ModelOutput(seg=conv(x), side=(), hog=(), presence=None, scene=None, approx=None)

    x = torch.rand(1, 4, 9, 20, 22, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seg = lambda model, image, batch=None, out_size=None: model(image).seg.argmax(1)  # noqa: E731
    whole = predict_batch(Pointwise(), seg, x, pad_multiple=1)
    windowed = predict_batch(Pointwise(), seg, x, pad_multiple=1, window=(4, 8, 8), window_overlap=0.5)
    assert torch.equal(whole, windowed)
    with pytest.raises(ValueError, match="3 axes"):
        predict_batch(Pointwise(), seg, x[:, :, 0], pad_multiple=1, window=(4, 8, 8))
