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


def pyskl_test_clips(num_frames, clip_len, num_clips):
    """pyskl's UniformSampleFrames._get_test_clips, verbatim apart from names."""
    np.random.seed(255)  # noqa: NPY002 - pyskl uses the legacy global stream
    all_inds = []
    for i in range(num_clips):
        if num_frames < clip_len:
            start_ind = i if num_frames < num_clips else i * num_frames // num_clips
            inds = np.arange(start_ind, start_ind + clip_len)
        elif clip_len <= num_frames < clip_len * 2:
            basic = np.arange(clip_len)
            inds = np.random.choice(clip_len + 1, num_frames - clip_len, replace=False)  # noqa: NPY002
            offset = np.zeros(clip_len + 1, dtype=np.int64)
            offset[inds] = 1
            inds = basic + np.cumsum(offset)[:-1]
        else:
            bids = np.array([i * num_frames // clip_len for i in range(clip_len + 1)])
            inds = bids[:clip_len] + np.random.randint(np.diff(bids))  # noqa: NPY002
        all_inds.append(inds)
    return np.mod(np.stack(all_inds), num_frames)


@pytest.mark.parametrize("length", [5, 40, 100, 150, 300])
def test_uniform_test_clips_are_pyskls(length):
    assert np.array_equal(sampling.uniform_indices(length, 100, 10), pyskl_test_clips(length, 100, 10))


def ctrgcn_rot(angles):
    """CTR-GCN's tools._rot for one angle triple (torch), verbatim apart from names."""
    rot = torch.tensor(angles, dtype=torch.float64)[None]
    cos_r, sin_r = rot.cos(), rot.sin()
    zeros, ones = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    r1 = torch.stack((ones, zeros, zeros), dim=-1)
    rx2 = torch.stack((zeros, cos_r[:, 0:1], sin_r[:, 0:1]), dim=-1)
    rx3 = torch.stack((zeros, -sin_r[:, 0:1], cos_r[:, 0:1]), dim=-1)
    rx = torch.cat((r1, rx2, rx3), dim=1)
    ry1 = torch.stack((cos_r[:, 1:2], zeros, -sin_r[:, 1:2]), dim=-1)
    r2 = torch.stack((zeros, ones, zeros), dim=-1)
    ry3 = torch.stack((sin_r[:, 1:2], zeros, cos_r[:, 1:2]), dim=-1)
    ry = torch.cat((ry1, r2, ry3), dim=1)
    rz1 = torch.stack((cos_r[:, 2:3], sin_r[:, 2:3], zeros), dim=-1)
    r3 = torch.stack((zeros, zeros, ones), dim=-1)
    rz2 = torch.stack((-sin_r[:, 2:3], cos_r[:, 2:3], zeros), dim=-1)
    rz = torch.cat((rz1, rz2, r3), dim=1)
    return rz.matmul(ry).matmul(rx)[0].numpy()


def test_rotation_matrix_is_ctrgcns():
    for angles in ([0.1, -0.2, 0.3], [0.3, 0.0, -0.25]):
        np.testing.assert_allclose(sampling.rotation_matrix(np.array(angles)), ctrgcn_rot(angles), atol=1e-12)


def test_random_rotation_preserves_norms_and_zeros():
    x = clip()
    x[:, :, :, 1] = 0
    out = sampling.random_rotation(x, 0.3, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), np.linalg.norm(x, axis=0), rtol=1e-5)
    assert not out[:, :, :, 1].any() and not np.allclose(out, x)
    assert np.allclose(sampling.rotation_matrix(np.zeros(3)), np.eye(3))
