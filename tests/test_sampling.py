"""Temporal sampling and augmentation against the reference implementations' behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import sampling


def clip(t=90, seed=0):
    return np.random.default_rng(seed).normal(size=(3, t, 25, 2)).astype(np.float32)


@pytest.mark.parametrize(("length", "window"), [(90, 64), (40, 64), (64, 64), (300, 100)])
def test_resize_matches_torch_bilinear(length, window):
    x = clip(length)
    c, t, v, m = x.shape
    flat = torch.from_numpy(x).permute(0, 2, 3, 1).reshape(1, 1, c * v * m, t)
    ref = F.interpolate(flat, size=(c * v * m, window), mode="bilinear", align_corners=False)
    ref = ref.reshape(c, v, m, window).permute(0, 3, 1, 2).numpy()
    np.testing.assert_allclose(sampling.resize_time(x, window), ref, rtol=1e-5, atol=1e-6)


def test_centre_crop_is_deterministic_and_centred():
    x = clip(100)
    out = sampling.crop_resize(x, 100, 64, (0.5,))
    np.testing.assert_allclose(out, sampling.resize_time(x[:, 25:75], 64))
    assert np.array_equal(sampling.crop_resize(x, 100, 64, (0.5,)), out)


def test_random_crop_keeps_at_least_min_frames():
    x = np.broadcast_to(np.arange(200, dtype=np.float32)[None, :, None, None], (3, 200, 25, 2)).copy()
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = sampling.crop_resize(x, 120, 64, (0.5, 1.0), rng)
        span = out[0, -1, 0, 0] - out[0, 0, 0, 0]
        assert out.shape == (3, 64, 25, 2)
        assert out.max() < 120  # never reads the padding
        assert span >= 64 * (63 / 64) - 1.5  # a crop of >= 64 frames resized to 64


def test_uniform_indices_cover_segments():
    rng = np.random.default_rng(0)
    inds = sampling.uniform_indices(300, 100, 2, rng)
    assert inds.shape == (2, 100)
    assert (np.diff(inds, axis=1) > 0).all() and inds.max() < 300
    assert ((inds // 3) == np.arange(100)).all()  # one frame from each segment of 3
    short = sampling.uniform_indices(30, 100, 1, rng)
    assert short.max() < 30 and short.shape == (1, 100)
    mid = sampling.uniform_indices(150, 100, 1, rng)
    assert len(np.unique(mid)) == 100 and (np.diff(mid) > 0).all()


def test_random_rotation_preserves_norms_and_zeros():
    x = clip()
    x[:, :, :, 1] = 0
    out = sampling.random_rotation(x, 0.3, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), np.linalg.norm(x, axis=0), rtol=1e-5)
    assert not out[:, :, :, 1].any() and not np.allclose(out, x)
    assert np.allclose(sampling.rotation_matrix(np.zeros(3)), np.eye(3))
