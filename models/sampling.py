"""Temporal sampling and augmentation of one sample ``(C, T, V, M)`` (NumPy, float32).

- ``crop_resize``: CTR-GCN's ``valid_crop_resize``: crop a ratio of the valid frames (random in
  ``[p_min, p_max]`` at train time, at least ``min_frames``; centred with a fixed ratio at test time),
  then linearly resize to ``window`` frames (identical to ``F.interpolate(mode="bilinear",
  align_corners=False)`` along time).
- ``uniform_indices``: pyskl's ``UniformSampleFrames`` (``clip_len`` frames from equal segments,
  ``num_clips`` clips; test clips exactly as pyskl draws them, from its fixed seed 255).
- ``random_rotation``: CTR-GCN's ``random_rot`` (one rotation ``Rz @ Ry @ Rx`` per sample, angles
  uniform in ``[-theta, theta]``).
"""

from __future__ import annotations

import numpy as np

PYSKL_TEST_SEED = 255


def resize_time(x: np.ndarray, window: int) -> np.ndarray:
    """Linear resize along T of ``x`` ``(C, T, V, M)`` to ``(C, window, V, M)`` (align_corners=False)."""
    length = x.shape[1]
    scale = length / window
    src = np.clip((np.arange(window, dtype=np.float64) + 0.5) * scale - 0.5, 0.0, None)
    lo = np.minimum(np.floor(src).astype(np.int64), length - 1)
    hi = np.minimum(lo + 1, length - 1)
    w = (src - lo).astype(np.float32)[None, :, None, None]
    return (x[:, lo] * (1.0 - w) + x[:, hi] * w).astype(np.float32, copy=False)


def crop_resize(
    x: np.ndarray,
    length: int,
    window: int,
    p_interval: tuple[float, ...],
    rng: np.random.Generator | None = None,
    min_frames: int = 64,
) -> np.ndarray:
    """Crop the valid frames ``x[:, :length]`` and resize to ``(C, window, V, M)``.

    ``p_interval`` of one value is the test-time centre crop ratio (e.g. ``(0.95,)``); of two values
    the train-time random ratio range (e.g. ``(0.5, 1.0)``), which needs ``rng``.
    """
    if length < 1:
        raise ValueError("crop_resize needs at least one valid frame")
    if len(p_interval) == 1:
        bias = int((1 - p_interval[0]) * length / 2)
        data = x[:, bias : length - bias]
    else:
        if rng is None:
            raise ValueError("a random crop (two-value p_interval) needs an rng")
        p = rng.random() * (p_interval[1] - p_interval[0]) + p_interval[0]
        cropped = min(max(int(np.floor(length * p)), min_frames), length)
        bias = int(rng.integers(0, length - cropped + 1))
        data = x[:, bias : bias + cropped]
    return resize_time(data, window)


def uniform_indices(
    length: int, clip_len: int, num_clips: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """pyskl ``UniformSampleFrames`` frame indices, int ``(num_clips, clip_len)``, all ``< length``.

    With ``rng`` the train-time clips; without, pyskl's test clips exactly: its legacy
    ``np.random.seed(255)`` stream, and fixed starts for samples shorter than a clip.
    """
    legacy = np.random.RandomState(PYSKL_TEST_SEED) if rng is None else None
    clips = []
    for i in range(num_clips):
        if length < clip_len:
            if legacy is not None:
                start = i if length < num_clips else i * length // num_clips
            else:
                start = int(rng.integers(0, length))
            inds = np.arange(start, start + clip_len)
        elif length < 2 * clip_len:
            choice = legacy.choice if legacy is not None else rng.choice
            offset = np.zeros(clip_len + 1, dtype=np.int64)
            offset[choice(clip_len + 1, length - clip_len, replace=False)] = 1
            inds = np.arange(clip_len) + np.cumsum(offset)[:-1]
        else:
            bids = np.array([i * length // clip_len for i in range(clip_len + 1)])
            sizes = np.diff(bids)
            inds = bids[:clip_len] + (legacy.randint(sizes) if legacy is not None else rng.integers(sizes))
        clips.append(inds % length)
    return np.stack(clips)


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles ``(3,)`` = (about x, about y, about z), in radians."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, sx], [0, -sx, cx]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(x: np.ndarray, theta: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate ``x`` ``(C=3, T, V, M)`` by one random rotation (angles uniform in ``[-theta, theta]``)."""
    rot = rotation_matrix(rng.uniform(-theta, theta, size=3)).astype(np.float32)
    c, t, v, m = x.shape
    return (rot @ x.reshape(c, -1)).reshape(c, t, v, m)
