"""A kinematic body model: performer proportions and forward kinematics to the 25 Kinect joints.

Body-local frame (metres): ``x`` to the performer's left, ``y`` up, ``z`` forward (the direction the
performer faces); right-handed. A :class:`Pose` holds joint angles (radians) and root motion per frame;
:func:`forward_kinematics` turns a shape and a pose into joint positions ``(F, 25, 3)`` in the stage
frame (the floor is ``y = 0``). Angles are defined symmetrically, so the same value on the left and the
right side gives a mirror-symmetric pose (see :func:`mirror`).

The model knows nothing about cameras or files, so the same bodies can be rendered as video later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from models.skeleton import JOINT_NAMES, NUM_JOINTS, PARENTS

J = {name: i for i, name in enumerate(JOINT_NAMES)}

# Joints whose Kinect orientation is reported as 0 0 0 0 (the leaves of the Kinect v2 joint tree).
LEAF_JOINTS = (J["head"], J["left_foot"], J["right_foot"], J["left_hand_tip"], J["left_thumb"],
               J["right_hand_tip"], J["right_thumb"])  # fmt: skip


@dataclass(frozen=True)
class BodyShape:
    """Segment lengths of one performer, in metres (Kinect joint centres, not the skin)."""

    height: float
    pelvis: float  # floor to spine base, standing
    spine_low: float  # spine base -> spine middle
    spine_high: float  # spine middle -> spine shoulder
    neck: float  # spine shoulder -> neck
    head: float  # neck -> head
    shoulder_half: float  # spine shoulder -> shoulder, sideways
    upper_arm: float
    forearm: float
    hand: float  # wrist -> hand
    hand_tip: float  # hand -> hand tip
    thumb: float  # hand -> thumb
    hip_half: float  # spine base -> hip, sideways
    hip_drop: float  # spine base -> hip, downwards
    thigh: float
    shank: float
    ankle: float  # ankle height over the floor
    foot: float  # ankle -> foot joint


def make_shape(height: float, arm: float = 1.0, leg: float = 1.0, torso: float = 1.0, width: float = 1.0):
    """A :class:`BodyShape` from a height (m) and ratios around 1 for arms, legs, torso and width.

    The base fractions of the height follow standard anthropometric tables (Drillis & Contini).
    """
    h = height
    thigh, shank, ankle = 0.245 * h * leg, 0.246 * h * leg, 0.039 * h
    hip_drop = 0.035 * h
    return BodyShape(
        height=h,
        pelvis=thigh + shank + ankle + hip_drop,
        spine_low=0.16 * h * torso,
        spine_high=0.14 * h * torso,
        neck=0.045 * h,
        head=0.06 * h,
        shoulder_half=0.1 * h * width,
        upper_arm=0.165 * h * arm,
        forearm=0.145 * h * arm,
        hand=0.04 * h * arm,
        hand_tip=0.045 * h * arm,
        thumb=0.03 * h * arm,
        hip_half=0.05 * h * width,
        hip_drop=hip_drop,
        thigh=thigh,
        shank=shank,
        ankle=ankle,
        foot=0.07 * h,
    )


def sample_shape(rng: np.random.Generator) -> BodyShape:
    """A random adult: height ~ N(1.70, 0.09) m clipped to 1.50-1.95, ratios within about +-7 %."""
    height = float(np.clip(rng.normal(1.70, 0.09), 1.50, 1.95))
    arm, leg, torso = (float(np.clip(rng.normal(1.0, 0.035), 0.92, 1.08)) for _ in range(3))
    width = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.15))
    return make_shape(height, arm, leg, torso, width)


@dataclass
class Pose:
    """Joint angles (rad) and root motion over ``F`` frames; every field is float64 ``(F,)``.

    Positive values: ``trunk_pitch`` bends forward, ``trunk_roll`` leans right, ``*_sh_flex`` raises the
    arm forwards, ``*_sh_abd`` raises it sideways, ``*_sh_rot`` rotates it outwards, ``*_elbow`` and
    ``*_knee`` bend, ``*_hip_flex`` swings the thigh forwards, ``*_hip_abd`` outwards. ``root_x`` /
    ``root_z`` move the performer left / forward (m, in the performer's starting frame), ``yaw`` turns
    them to their left (rad), ``pitch`` tips the whole body forwards about the spine base (rad, lying
    down), ``lift`` raises them off the floor (m, jumps).
    """

    root_x: np.ndarray
    root_z: np.ndarray
    lift: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    trunk_pitch: np.ndarray
    trunk_roll: np.ndarray
    trunk_twist: np.ndarray
    head_pitch: np.ndarray
    head_yaw: np.ndarray
    l_sh_flex: np.ndarray
    l_sh_abd: np.ndarray
    l_sh_rot: np.ndarray
    l_elbow: np.ndarray
    l_wrist: np.ndarray
    r_sh_flex: np.ndarray
    r_sh_abd: np.ndarray
    r_sh_rot: np.ndarray
    r_elbow: np.ndarray
    r_wrist: np.ndarray
    l_hip_flex: np.ndarray
    l_hip_abd: np.ndarray
    l_knee: np.ndarray
    l_ankle: np.ndarray
    r_hip_flex: np.ndarray
    r_hip_abd: np.ndarray
    r_knee: np.ndarray
    r_ankle: np.ndarray

    @property
    def frames(self) -> int:
        return len(self.yaw)

    def map(self, fn) -> Pose:
        """A new pose with ``fn(array)`` applied to every field (e.g. slicing, reversing)."""
        return Pose(**{f.name: np.asarray(fn(getattr(self, f.name)), dtype=np.float64) for f in FIELDS})


FIELDS = dataclasses.fields(Pose)
FIELD_NAMES = tuple(f.name for f in FIELDS)
# Translation fields are not angles (no amplitude scaling, no posture noise).
TRANSLATIONS = ("root_x", "root_z", "lift", "yaw")
# Relaxed standing: arms hang slightly away from the body, elbows and knees a little bent.
REST = {"l_sh_abd": 0.1, "r_sh_abd": 0.1, "l_elbow": 0.2, "r_elbow": 0.2, "l_knee": 0.04, "r_knee": 0.04}


def rest_pose(frames: int) -> Pose:
    """``frames`` frames of relaxed standing at the origin, facing +z."""
    return Pose(**{name: np.full(frames, REST.get(name, 0.0)) for name in FIELD_NAMES})


def mirror(pose: Pose) -> Pose:
    """The left/right mirror image of a pose (a left-handed performer doing a right-handed action)."""
    values = {}
    for name in FIELD_NAMES:
        source = {"l_": "r_", "r_": "l_"}.get(name[:2], "")
        value = getattr(pose, source + name[2:] if source else name)
        sign = -1.0 if name in ("root_x", "yaw", "trunk_roll", "trunk_twist", "head_yaw") else 1.0
        values[name] = sign * value
    return Pose(**values)


# --------------------------------------------------------------------------------------------
# Rotations, batched over frames: (F,) angles -> (F, 3, 3)


def rot_x(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([o, z, z, z, c, -s, z, s, c], axis=-1).reshape(-1, 3, 3)


def rot_y(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([c, z, s, z, o, z, -s, z, c], axis=-1).reshape(-1, 3, 3)


def rot_z(a: np.ndarray) -> np.ndarray:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([c, -s, z, s, c, z, z, z, o], axis=-1).reshape(-1, 3, 3)


def _apply(rot: np.ndarray, vec) -> np.ndarray:
    """Rotate a fixed vector (3,) or per-frame vectors (F, 3) by (F, 3, 3) matrices."""
    return np.einsum("fij,fj->fi", rot, np.broadcast_to(np.asarray(vec, dtype=np.float64), rot.shape[:2]))


def _arm(out, shape: BodyShape, pose: Pose, trunk: np.ndarray, side: str, sign: float) -> None:
    p = side[0] + "_"
    prefix = "left_" if side == "left" else "right_"
    flex, abd, rot = (getattr(pose, p + k) for k in ("sh_flex", "sh_abd", "sh_rot"))
    shoulder = out[:, J["spine_shoulder"]] + _apply(
        trunk, (sign * shape.shoulder_half, -0.02 * shape.height, 0)
    )
    upper = trunk @ rot_x(-flex) @ rot_z(sign * abd) @ rot_y(sign * rot)
    elbow = shoulder + _apply(upper, (0, -shape.upper_arm, 0))
    fore = upper @ rot_x(-getattr(pose, p + "elbow"))
    wrist = elbow + _apply(fore, (0, -shape.forearm, 0))
    hand_rot = fore @ rot_x(-getattr(pose, p + "wrist"))
    hand = wrist + _apply(hand_rot, (0, -shape.hand, 0))
    out[:, J[prefix + "shoulder"]] = shoulder
    out[:, J[prefix + "elbow"]] = elbow
    out[:, J[prefix + "wrist"]] = wrist
    out[:, J[prefix + "hand"]] = hand
    out[:, J[prefix + "hand_tip"]] = hand + _apply(hand_rot, (0, -shape.hand_tip, 0))
    thumb_dir = np.array([-0.25 * sign, -0.45, 0.86])
    out[:, J[prefix + "thumb"]] = hand + _apply(hand_rot, shape.thumb * thumb_dir)


def _leg(out, shape: BodyShape, pose: Pose, side: str, sign: float) -> None:
    p = side[0] + "_"
    prefix = "left_" if side == "left" else "right_"
    frames = pose.frames
    hip = out[:, J["spine_base"]] + np.array([sign * shape.hip_half, -shape.hip_drop, 0.0])
    thigh = rot_x(-getattr(pose, p + "hip_flex")) @ rot_z(sign * getattr(pose, p + "hip_abd"))
    knee = hip + _apply(thigh, (0, -shape.thigh, 0))
    shank = thigh @ rot_x(getattr(pose, p + "knee"))
    ankle = knee + _apply(shank, (0, -shape.shank, 0))
    foot_rot = shank @ rot_x(np.full(frames, -np.pi / 2) + getattr(pose, p + "ankle"))
    out[:, J[prefix + "hip"]] = hip
    out[:, J[prefix + "knee"]] = knee
    out[:, J[prefix + "ankle"]] = ankle
    out[:, J[prefix + "foot"]] = ankle + _apply(foot_rot, (0, -shape.foot, -0.3 * shape.ankle))


# Lowest allowed height (m) of the joints that can touch the floor, as fractions of the body height.
_SUPPORT = {"left_ankle": 0.039, "right_ankle": 0.039, "left_foot": 0.015, "right_foot": 0.015,
            "left_knee": 0.03, "right_knee": 0.03, "spine_base": 0.06, "spine_middle": 0.07,
            "spine_shoulder": 0.07, "head": 0.06}  # fmt: skip


def forward_kinematics(shape: BodyShape, pose: Pose) -> np.ndarray:
    """Joint positions float64 ``(F, 25, 3)`` in metres in the stage frame (floor at ``y = 0``).

    Each frame is lowered onto the floor (its lowest supporting joint touches it), then raised by
    ``pose.lift``: standing, sitting, kneeling and lying need no explicit root height.
    """
    frames = pose.frames
    out = np.zeros((frames, NUM_JOINTS, 3))
    out[:, J["spine_base"]] = (0.0, shape.pelvis, 0.0)
    lower = rot_y(0.5 * pose.trunk_twist) @ rot_x(0.5 * pose.trunk_pitch) @ rot_z(0.5 * pose.trunk_roll)
    trunk = rot_y(pose.trunk_twist) @ rot_x(pose.trunk_pitch) @ rot_z(pose.trunk_roll)
    out[:, J["spine_middle"]] = out[:, J["spine_base"]] + _apply(lower, (0, shape.spine_low, 0))
    out[:, J["spine_shoulder"]] = out[:, J["spine_middle"]] + _apply(trunk, (0, shape.spine_high, 0))
    head = trunk @ rot_y(pose.head_yaw) @ rot_x(pose.head_pitch)
    out[:, J["neck"]] = out[:, J["spine_shoulder"]] + _apply(trunk, (0, shape.neck, 0))
    out[:, J["head"]] = out[:, J["neck"]] + _apply(head, (0, shape.head, 0.15 * shape.head))
    for side, sign in (("left", 1.0), ("right", -1.0)):
        _arm(out, shape, pose, trunk, side, sign)
        _leg(out, shape, pose, side, sign)
    base = out[:, J["spine_base"]].copy()
    out = np.einsum("fij,fvj->fvi", rot_x(pose.pitch), out - base[:, None]) + base[:, None]
    clearance = np.array([out[:, J[n], 1] - f * shape.height for n, f in _SUPPORT.items()])
    out[:, :, 1] += (pose.lift - clearance.min(axis=0))[:, None]
    world = np.einsum("fij,fvj->fvi", rot_y(pose.yaw), out)
    world[:, :, 0] += pose.root_x[:, None]
    world[:, :, 2] += pose.root_z[:, None]
    return world


def joint_orientations(xyz: np.ndarray) -> np.ndarray:
    """Kinect-like joint orientations, float64 ``(..., 25, 4)`` unit quaternions ``W X Y Z``.

    ``xyz`` is ``(..., 25, 3)``. The y axis of joint ``j`` runs along its bone (parent -> ``j``; the spine
    base uses spine base -> spine middle), the x axis is the body's left-right axis made orthogonal to
    it. Leaf joints (head, feet, hand tips, thumbs) get ``0 0 0 0``, as the Kinect reports them.
    """
    parents = np.array(PARENTS)
    bone = xyz - xyz[..., parents, :]
    bone[..., J["spine_base"], :] = xyz[..., J["spine_middle"], :] - xyz[..., J["spine_base"], :]
    bone[..., J["spine_shoulder"], :] = xyz[..., J["spine_shoulder"], :] - xyz[..., J["spine_middle"], :]
    y = bone / np.maximum(np.linalg.norm(bone, axis=-1, keepdims=True), 1e-9)
    across = xyz[..., J["left_shoulder"], :] - xyz[..., J["right_shoulder"], :]
    across = np.broadcast_to(across[..., None, :], y.shape)
    x = across - np.sum(across * y, axis=-1, keepdims=True) * y
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)
    z = np.cross(x, y)
    quat = _matrix_to_quaternion(np.stack([x, y, z], axis=-1))
    quat[..., list(LEAF_JOINTS), :] = 0.0
    return quat


def _matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)`` (W X Y Z, W >= 0)."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    w = 0.5 * np.sqrt(np.maximum(0.0, 1 + m00 + m11 + m22))
    x = 0.5 * np.sqrt(np.maximum(0.0, 1 + m00 - m11 - m22)) * np.sign(m[..., 2, 1] - m[..., 1, 2])
    y = 0.5 * np.sqrt(np.maximum(0.0, 1 - m00 + m11 - m22)) * np.sign(m[..., 0, 2] - m[..., 2, 0])
    z = 0.5 * np.sqrt(np.maximum(0.0, 1 - m00 - m11 + m22)) * np.sign(m[..., 1, 0] - m[..., 0, 1])
    quat = np.stack([w, x, y, z], axis=-1)
    return quat / np.maximum(np.linalg.norm(quat, axis=-1, keepdims=True), 1e-12)
