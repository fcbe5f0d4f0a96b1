"""Feature math: bones, motion, centring and view alignment (NumPy and torch alike)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import features
from models.skeleton import PARENTS, SPINE_MIDDLE


def random_block(n=3, t=20, seed=0, absent_second=True):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 0.3, (n, 3, t, 25, 2)) + np.array([0.2, 0.1, 3.0])[None, :, None, None, None]).astype(
        np.float32
    )
    if absent_second:
        x[0, :, :, :, 1] = 0  # sample 0 has one person
    x[:, :, t - 5 :] = 0  # padding
    return x


def test_bones_are_child_minus_parent_with_zero_centre():
    x = random_block()
    b = features.bones(x)
    assert np.array_equal(b[..., 4, :], x[..., 4, :] - x[..., 20, :])  # left shoulder <- spine shoulder
    assert np.array_equal(b[..., 0, :], x[..., 0, :] - x[..., PARENTS[0], :])
    assert not b[..., 20, :].any()
    assert not b[0, :, :, :, 1].any()  # an absent person has zero bones


def test_motion_last_frame_zero_and_respects_lengths():
    x = random_block()
    m = features.motion(x)
    assert np.array_equal(m[:, :, 3], x[:, :, 4] - x[:, :, 3])
    assert not m[:, :, -1].any()
    lengths = np.array([15, 10, 15])
    ml = features.motion(x, lengths)
    assert not ml[1, :, 9:].any() and ml[1, :, 8].any()  # no jump into the padding
    assert np.array_equal(ml[0, :, :14], m[0, :, :14])


def test_numpy_and_torch_give_the_same_streams():
    x = random_block()
    for fn in (features.bones, features.motion):
        np.testing.assert_array_equal(fn(torch.from_numpy(x)).numpy(), fn(x))


def test_centre_uses_actor_one_spine_middle_of_first_present_frame():
    x = random_block()
    x[1, :, :2] = 0  # sample 1 starts at frame 2
    origin = x[1, :, 2, SPINE_MIDDLE, 0].copy()
    c = features.centre(x)
    assert np.allclose(c[1, :, 2, SPINE_MIDDLE, 0], 0)
    np.testing.assert_allclose(c[1, :, 7, 3, 1], x[1, :, 7, 3, 1] - origin, rtol=1e-6)
    assert not c[1, :, :2].any() and not c[:, :, -5:].any()  # absent frames stay zero
    assert not c[0, :, :, :, 1].any()
    assert c.dtype == np.float32


def _centre_by_definition(x: np.ndarray) -> np.ndarray:
    """``centre`` written as the definition reads (the pipeline's first version, 4x slower)."""
    present = np.any(x != 0, axis=(1, 3))  # N, T, M
    out = x.copy()
    for i in range(x.shape[0]):
        frames = np.flatnonzero(present[i, :, 0])
        if frames.size:
            origin = x[i, :, frames[0], SPINE_MIDDLE, 0].copy()
            np.subtract(out[i], origin[:, None, None, None], out=out[i], where=present[i][None, :, None, :])
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centre_and_presence_give_the_definitions_bytes(dtype):
    """The features stage's output must not change with the implementation (its DVC outputs and
    the trained models depend on it): same bytes, signed zeros included, on blocks with absent
    frames, absent persons, empty samples, zero joints and negative zeros."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n, t, m = (int(v) for v in (rng.integers(1, 4), rng.integers(1, 30), rng.integers(1, 3)))
        x = rng.normal(size=(n, 3, t, 25, m)).astype(dtype)
        x *= rng.random((n, 1, t, 1, m)) > 0.3  # absent frames / persons
        x[rng.random(x.shape) < 0.05] = -0.0
        x[rng.random(n) < 0.15] = 0  # samples with nobody
        assert np.array_equal(features.presence(x), np.any(x != 0, axis=(1, 3)))
        c = features.centre(x)
        assert c.dtype == x.dtype and c.tobytes() == _centre_by_definition(x).tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_align_view_puts_spine_on_z_and_keeps_lengths(seed):
    x = features.centre(random_block(seed=seed))
    a = features.align_view(x)
    spine = a[:, :, 0, 1, 0] - a[:, :, 0, 0, 0]  # first frame, spine base -> middle
    np.testing.assert_allclose(spine[:, :2], 0, atol=1e-5)
    assert (spine[:, 2] > 0).all()
    shoulders = a[:, :, 0, 8, 0] - a[:, :, 0, 4, 0]
    assert (shoulders[:, 0] > 0).all() and np.allclose(shoulders[:, 1], 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(x, axis=1), rtol=1e-4, atol=1e-6)


def test_streams_are_derived_once_and_names_checked():
    x = random_block()
    out = features.streams(x, ("bone_motion", "joint", "bone"), lengths=np.array([15, 10, 15]))
    assert list(out) == ["bone_motion", "joint", "bone"] and out["joint"] is x
    assert np.array_equal(out["bone_motion"], features.motion(features.bones(x), np.array([15, 10, 15])))
    with pytest.raises(ValueError, match="unknown stream\\(s\\) velocity; valid: joint, bone"):
        features.streams(x, ("joint", "velocity"))
