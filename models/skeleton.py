"""The NTU RGB+D (Kinect v2) skeleton topology, defined once, 0-based.

Everything else (bone pairs, graph adjacency, left/right swaps) is derived from ``PARENTS``.
The dataset paper numbers joints from 1; here joint ``i`` is the paper's joint ``i + 1``.
"""

from __future__ import annotations

import numpy as np

NUM_JOINTS = 25
MAX_PERSONS = 2
# The farthest a kept joint may be from the camera, in metres (parse, the server's clips): Kinect v2
# sees to about 8 m; a value beyond tens of metres is not a body (and 65,520 m overflows the
# float16 feature streams)
MAX_COORDINATE_M = 50.0

JOINT_NAMES: tuple[str, ...] = (
    "spine_base",  # 0
    "spine_middle",  # 1
    "neck",  # 2
    "head",  # 3
    "left_shoulder",  # 4
    "left_elbow",  # 5
    "left_wrist",  # 6
    "left_hand",  # 7
    "right_shoulder",  # 8
    "right_elbow",  # 9
    "right_wrist",  # 10
    "right_hand",  # 11
    "left_hip",  # 12
    "left_knee",  # 13
    "left_ankle",  # 14
    "left_foot",  # 15
    "right_hip",  # 16
    "right_knee",  # 17
    "right_ankle",  # 18
    "right_foot",  # 19
    "spine_shoulder",  # 20
    "left_hand_tip",  # 21
    "left_thumb",  # 22
    "right_hand_tip",  # 23
    "right_thumb",  # 24
)

# PARENTS[child] = parent. The centre joint (spine shoulder, 20) is its own parent, which gives it
# the zero bone the NTU convention asks for (25 bones for 25 joints).
PARENTS: tuple[int, ...] = (
    1, 20, 20, 2, 20, 4, 5, 6, 20, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18, 20, 22, 7, 24, 11,
)  # fmt: skip

CENTER_JOINT = 20
SPINE_BASE = 0
SPINE_MIDDLE = 1
LEFT_SHOULDER = 4
RIGHT_SHOULDER = 8

# Graph edges (child, parent), 0-based, without the centre's self-pair: the 24 edges of ST-GCN/CTR-GCN.
EDGES: tuple[tuple[int, int], ...] = tuple((c, p) for c, p in enumerate(PARENTS) if c != p)


def _mirror_name(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[len("left_") :]
    if name.startswith("right_"):
        return "left_" + name[len("right_") :]
    return name


# FLIP_INDEX[j] is the joint that j becomes under a left/right mirror (used by pose augmentation).
FLIP_INDEX: tuple[int, ...] = tuple(JOINT_NAMES.index(_mirror_name(n)) for n in JOINT_NAMES)


def adjacency_subsets() -> np.ndarray:
    """The 3 CTR-GCN adjacency subsets (identity, inward, outward), each column-normalised.

    Returns float32 ``(3, V, V)``: ``A[0] = I``; ``A[1][c, p] = 1`` for each edge from child ``c``
    towards its parent ``p`` (inward, towards the centre), normalised by in-degree as in CTR-GCN's
    ``normalize_digraph``; ``A[2]`` the same for the reversed (outward) edges.
    """
    v = NUM_JOINTS
    inward = np.zeros((v, v), dtype=np.float32)
    for child, parent in EDGES:
        inward[parent, child] = 1.0  # column = source joint, row = target joint
    outward = inward.T.copy()

    def normalise(a: np.ndarray) -> np.ndarray:
        degree = a.sum(axis=0)
        inv = np.where(degree > 0, 1.0 / np.maximum(degree, 1e-12), 0.0).astype(np.float32)
        return a * inv[None, :]

    return np.stack([np.eye(v, dtype=np.float32), normalise(inward), normalise(outward)])
