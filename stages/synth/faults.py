"""Kinect faults: joint jitter, inferred and untracked joints, noise bodies, id switches, empty frames.

All functions are pure (randomness only from the ``rng`` passed in) and work in Kinect camera space
(metres). The noise bodies are built to be removed by the standard NTU denoising rules: short ones
last at most 11 frames (the length rule), "furniture" bodies are much wider than tall in every frame
(the spread rule: x-range > 0.8 x y-range in at least 69.754 % of a body's frames).
"""

from __future__ import annotations

import numpy as np

from models.skeleton import NUM_JOINTS
from stages.synth.body import J, forward_kinematics, make_shape, rest_pose

TRACKED, INFERRED, NOT_TRACKED = 2, 1, 0
# Joints the Kinect loses most often, grouped as it loses them (a hand goes with its tip and thumb).
_GROUPS = (
    (J["left_hand"], J["left_hand_tip"], J["left_thumb"]),
    (J["right_hand"], J["right_hand_tip"], J["right_thumb"]),
    (J["left_wrist"], J["left_hand"], J["left_hand_tip"], J["left_thumb"]),
    (J["right_wrist"], J["right_hand"], J["right_hand_tip"], J["right_thumb"]),
    (J["left_ankle"], J["left_foot"]),
    (J["right_ankle"], J["right_foot"]),
    (J["left_foot"],),
    (J["right_foot"],),
)
SHORT_NOISE_MAX_FRAMES = 11  # the standard length rule drops bodies seen in 11 frames or fewer


def jitter(frames: int, rng: np.random.Generator, sigma: float, rho: float = 0.6) -> np.ndarray:
    """Temporally correlated (AR(1), lag-1 correlation ``rho``) Gaussian noise ``(frames, 25, 3)``, m.

    ``sigma`` is the marginal standard deviation in x and y; depth (z) gets 1.5 times as much.
    """
    white = rng.normal(0.0, sigma, size=(frames, NUM_JOINTS, 3)) * np.array([1.0, 1.0, 1.5])
    out = np.empty_like(white)
    out[0] = white[0]
    scale = np.sqrt(1 - rho**2)
    for t in range(1, frames):
        out[t] = rho * out[t - 1] + scale * white[t]
    return out


def lost_joints(
    frames: int, rng: np.random.Generator, inferred_rate: float, untracked_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Episodes of inferred and untracked joints for one body.

    Returns ``(states uint8 (frames, 25), offsets float64 (frames, 25, 3))``: the tracking states
    (2 tracked, 1 inferred, 0 not tracked) and the position errors (m) the Kinect makes on those joints
    (a few cm when inferred, about 8 cm when not tracked). The rates are the expected fractions of
    hand/foot joint-frames in each state.
    """
    states = np.full((frames, NUM_JOINTS), TRACKED, dtype=np.uint8)
    offsets = np.zeros((frames, NUM_JOINTS, 3))
    for rate, state, length, error in ((inferred_rate, INFERRED, (2, 16), 0.035),
                                       (untracked_rate, NOT_TRACKED, (1, 5), 0.08)):  # fmt: skip
        mean_length = (length[0] + length[1] - 1) / 2
        count = rng.poisson(rate * frames * len(_GROUPS) / 2.5 / mean_length)
        for _ in range(count):
            group = list(_GROUPS[rng.integers(len(_GROUPS))])
            n = int(rng.integers(*length))
            start = int(rng.integers(0, max(1, frames - n + 1)))
            states[start : start + n, group] = np.minimum(states[start : start + n, group], state)
            drift = rng.normal(0.0, error, size=3) + np.linspace(0, 1, n)[:, None] * rng.normal(0, error, 3)
            offsets[start : start + n, group] += drift[: min(n, frames - start), None, :]
    return states, offsets


def short_noise_body(rng: np.random.Generator, near: np.ndarray | None) -> np.ndarray:
    """A ghost body of 2-11 frames ``(L, 25, 3)`` in camera space: a squashed, jumbled skeleton.

    ``near`` (3,), when given, is a camera-space point it appears next to (a mis-detection at the
    performer); otherwise it appears anywhere in the field of view.
    """
    length = int(rng.integers(2, SHORT_NOISE_MAX_FRAMES + 1))
    shape = make_shape(float(rng.uniform(0.6, 1.9)))
    template = forward_kinematics(shape, rest_pose(1))[0]
    template -= template[J["spine_middle"]]
    template *= np.array([rng.uniform(0.5, 1.5), rng.uniform(0.3, 1.0), rng.uniform(0.5, 1.5)])
    template += rng.normal(0.0, 0.06, size=template.shape)
    if near is not None:
        centre = near + rng.normal(0.0, 0.3, size=3)
    else:
        centre = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-0.8, 0.4), rng.uniform(1.5, 4.5)])
    drift = np.cumsum(rng.normal(0.0, 0.02, size=(length, 1, 3)), axis=0)
    return template[None] + centre + drift + rng.normal(0.0, 0.03, size=(length, NUM_JOINTS, 3))


def furniture_body(rng: np.random.Generator, length: int) -> np.ndarray:
    """A static "furniture / reflection" body of ``length`` frames ``(length, 25, 3)`` in camera space.

    Its joints lie in a flat, wide patch (width 0.6-1.4 m, height at most 0.4 x the width), so its
    x-range exceeds 0.8 x its y-range in every frame, and the spread rule removes it.
    """
    width = rng.uniform(0.6, 1.4)
    height = width * rng.uniform(0.1, 0.4)
    patch = np.stack([rng.uniform(-0.5, 0.5, NUM_JOINTS) * width, rng.uniform(-0.5, 0.5, NUM_JOINTS) * height,
                      rng.normal(0.0, 0.05, NUM_JOINTS)], axis=-1)  # fmt: skip
    patch[0, 0], patch[1, 0] = -0.5 * width, 0.5 * width  # the patch spans its full width
    centre = np.array([rng.uniform(-1.8, 1.8), rng.uniform(-1.0, 0.0), rng.uniform(2.0, 4.5)])
    return patch[None] + centre + rng.normal(0.0, 0.008, size=(length, NUM_JOINTS, 3))


def empty_frames(frames: int, rng: np.random.Generator, rate: float) -> tuple[np.ndarray, tuple[str, ...]]:
    """Frames where the Kinect reports no body at all: ``(bool (frames,), fault names)``.

    A run at the start (half the files, 1-8 frames), at the end (a third, 1-6 frames) and single
    frames inside with probability ``rate`` each.
    """
    empty = rng.random(frames) < rate
    kinds = ["empty_frames_inside"] if empty.any() else []
    if rng.random() < 0.5:
        empty[: int(rng.integers(1, 9))] = True
        kinds.append("empty_frames_start")
    if rng.random() < 1 / 3:
        empty[frames - int(rng.integers(1, 7)) :] = True
        kinds.append("empty_frames_end")
    return empty, tuple(kinds)


def body_ids(count: int, rng: np.random.Generator) -> list[int]:
    """``count`` 17-digit Kinect bodyIDs, increasing by 1-3 (too close for a float64 to tell apart)."""
    first = 72057594037927936 + int(rng.integers(1_000, 400_000))  # 2**56 + a small counter
    steps = rng.integers(1, 4, size=count)
    return [first + int(s) for s in np.cumsum(steps) - steps[0]]
