"""Small hand-built bodies and files for the tests (independent of the synthetic generator)."""

from __future__ import annotations

import numpy as np

from stages.skeleton_text import BodyRecord, format_number

# A standing-person template (metres, camera space, about 3 m from the sensor): taller than wide,
# so the spread rule treats it as a person.
STANDING = np.array(
    [
        [0.00, -0.20, 3.0], [0.00, 0.10, 3.0], [0.00, 0.40, 3.0], [0.00, 0.55, 3.0],
        [-0.18, 0.30, 3.0], [-0.25, 0.05, 3.0], [-0.28, -0.18, 3.0], [-0.28, -0.25, 3.0],
        [0.18, 0.30, 3.0], [0.25, 0.05, 3.0], [0.28, -0.18, 3.0], [0.28, -0.25, 3.0],
        [-0.10, -0.25, 3.0], [-0.11, -0.65, 3.0], [-0.12, -1.05, 3.0], [-0.12, -1.10, 2.9],
        [0.10, -0.25, 3.0], [0.11, -0.65, 3.0], [0.12, -1.05, 3.0], [0.12, -1.10, 2.9],
        [0.00, 0.35, 3.0], [-0.28, -0.30, 3.0], [-0.27, -0.24, 2.97], [0.28, -0.30, 3.0],
        [0.27, -0.24, 2.97],
    ]
)  # fmt: skip

# A wide, flat "furniture" body: x-range far above 0.8 x its y-range.
FLAT = np.column_stack([np.linspace(-1.0, 1.0, 25), np.linspace(-0.05, 0.05, 25), np.full(25, 2.5)])


def as_written(values: np.ndarray) -> np.ndarray:
    """float32 of the '%.7g' text the writer produces: what the parser must return."""
    flat = [np.float32(float(format_number(v))) for v in np.asarray(values, dtype=np.float64).ravel()]
    return np.array(flat, dtype=np.float32).reshape(np.shape(values))


def body(body_id: int, xyz: np.ndarray, tracking: int = 2) -> BodyRecord:
    """A body record with the given x, y, z and derived pixel coordinates."""
    xyz = np.asarray(xyz, dtype=np.float64)
    depth = np.column_stack([256 + 365 * xyz[:, 0] / xyz[:, 2], 209 - 365 * xyz[:, 1] / xyz[:, 2]])
    color = np.column_stack([980 + 1081 * xyz[:, 0] / xyz[:, 2], 540 - 1081 * xyz[:, 1] / xyz[:, 2]])
    orientation = np.tile([1.0, 0.0, 0.0, 0.0], (25, 1))
    joints = np.concatenate([xyz, depth, color, orientation], axis=1)
    return BodyRecord(body_id=body_id, joints=joints, tracking=np.full(25, tracking))


def moving(template: np.ndarray, frames: int, amplitude: float, seed: int = 0) -> np.ndarray:
    """``(frames, 25, 3)``: the template swaying sideways with the given amplitude (metres)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    offset = amplitude * np.sin(t / 5.0) * np.array([1.0, 0.2, 0.1])
    return template[None] + offset + rng.normal(0, 0.002, (frames, 25, 3))


def second_person_id_switch(frames: int = 40) -> bytes:
    """Two people; the second one's Kinect id changes halfway and its later body moves more than its
    earlier one, so CTR-GCN's preparation (``denoise="reference"``) drops the earlier half of person 2
    and the default (``"complete"``) keeps both halves. Person 1 (one id) moves most."""
    from stages.skeleton_text import format_skeleton

    half = frames // 2
    first = moving(STANDING, frames, 0.3, 1)
    early = moving(STANDING + np.array([1.0, 0, 0.2]), half, 0.02, 2)
    late = moving(STANDING + np.array([1.0, 0, 0.2]), frames - half, 0.1, 3)
    ids = (72057594037931101, 72057594037931107, 72057594037931109)
    return format_skeleton(
        [
            [body(ids[0], first[t]), body(ids[1], early[t]) if t < half else body(ids[2], late[t - half])]
            for t in range(frames)
        ]
    )
