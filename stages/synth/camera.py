"""Setups, the three Kinect v2 cameras, and projection to the depth and colour frames.

World (stage) frame: metres, floor at ``y = 0``, ``y`` up, the performer area centred on the origin.
Kinect camera space (what ``.skeleton`` files hold): ``x`` to the sensor's left, ``y`` up, ``z`` away
from the sensor; right-handed.

As in NTU RGB+D, the three cameras of a setup stand at the same height and distance, at -45, 0 and +45
degrees around the performer area, and record one performance at once. Camera 1 is the middle one (it
always sees 45-degree views), camera 2 stands at -45 and camera 3 at +45 degrees; in replication 1 the
performer faces camera 2, in replication 2 camera 3.

The intrinsics below are calibrated on a real NTU joint line (x 0.2181813, y 0.1725006, z 3.785027 ->
depth 277.4376 191.9117, colour 1036.508 519.1667), which they reproduce to about 0.5 px.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# Depth camera (512 x 424): u = cx + fx * x / z, v = cy - fy * y / z.
DEPTH_SIZE = (512, 424)
DEPTH_F, DEPTH_CX, DEPTH_CY = 365.0, 256.4, 208.55
# Colour camera (1920 x 1080), 4.97 cm to the depth camera's left (+x): u = cx + f * (x + b) / z.
COLOR_SIZE = (1920, 1080)
COLOR_F, COLOR_CX, COLOR_CY, COLOR_BASELINE = 1081.0, 960.0, 568.4, 0.0497

CAMERA_AZIMUTH_DEG = {1: 0.0, 2: -45.0, 3: 45.0}
FACED_CAMERA = {1: 2, 2: 3}  # replication -> the camera the performer faces


def stable_seed(*parts) -> int:
    """A 64-bit seed from any printable parts, the same on every machine and Python run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Setup:
    """One recording setup: camera height and distance to the area centre (m), aim height (m)."""

    height: float
    distance: float
    aim: float
    performer_offset: tuple[float, float]  # (x, z) of the performance spot, m


def make_setup(seed: int, setup: int) -> Setup:
    """The geometry of setup id ``setup``: height 0.6-1.6 m, distance 2.4-3.6 m (deterministic)."""
    rng = np.random.default_rng(stable_seed(seed, "setup", setup))
    return Setup(
        height=float(rng.uniform(0.6, 1.6)),
        distance=float(rng.uniform(2.4, 3.6)),
        aim=float(rng.uniform(0.85, 1.05)),
        performer_offset=(float(rng.normal(0, 0.12)), float(rng.normal(0, 0.12))),
    )


def camera_pose(setup: Setup, camera: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rotation (3, 3), position (3,))`` of a camera; ``rotation`` rows: its x, y, z axes in world."""
    azimuth = np.deg2rad(CAMERA_AZIMUTH_DEG[camera])
    position = np.array([setup.distance * np.sin(azimuth), setup.height, setup.distance * np.cos(azimuth)])
    forward = np.array([0.0, setup.aim, 0.0]) - position
    forward /= np.linalg.norm(forward)
    left = np.cross([0.0, 1.0, 0.0], forward)
    left /= np.linalg.norm(left)
    up = np.cross(forward, left)
    return np.stack([left, up, forward]), position


def facing_yaw(replication: int) -> float:
    """World yaw (rad) that turns a performer's forward (+z) towards the camera they face."""
    return float(np.deg2rad(CAMERA_AZIMUTH_DEG[FACED_CAMERA[replication]]))


def to_camera(world: np.ndarray, setup: Setup, camera: int) -> np.ndarray:
    """World points ``(..., 3)`` -> Kinect camera space ``(..., 3)`` (m)."""
    rotation, position = camera_pose(setup, camera)
    return (world - position) @ rotation.T


def project_depth(xyz: np.ndarray) -> np.ndarray:
    """Camera-space points ``(..., 3)`` (m) -> depth-frame pixels ``(..., 2)``."""
    z = np.maximum(xyz[..., 2], 1e-3)
    return np.stack([DEPTH_CX + DEPTH_F * xyz[..., 0] / z, DEPTH_CY - DEPTH_F * xyz[..., 1] / z], axis=-1)


def project_color(xyz: np.ndarray) -> np.ndarray:
    """Camera-space points ``(..., 3)`` (m) -> colour-frame pixels ``(..., 2)``."""
    z = np.maximum(xyz[..., 2], 1e-3)
    u = COLOR_CX + COLOR_F * (xyz[..., 0] + COLOR_BASELINE) / z
    return np.stack([u, COLOR_CY - COLOR_F * xyz[..., 1] / z], axis=-1)


def clipped_edges(depth_px: np.ndarray) -> np.ndarray:
    """Kinect ``clippedEdges`` bits int ``(...)`` from depth pixels ``(..., 25, 2)``.

    Bits: 1 a joint beyond the right edge, 2 the left, 4 the top, 8 the bottom of the 512 x 424 frame.
    """
    u, v = depth_px[..., 0], depth_px[..., 1]
    width, height = DEPTH_SIZE
    return (
        (u >= width).any(-1) * 1 | (u < 0).any(-1) * 2 | (v < 0).any(-1) * 4 | (v >= height).any(-1) * 8
    ).astype(int)
