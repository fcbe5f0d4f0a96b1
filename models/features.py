"""Skeleton feature math, defined once: normalisation, view alignment, bone and motion streams.

Layout everywhere: ``(..., C, T, V, M)`` (leading batch dims optional), coordinates in metres.
``bones`` and ``motion`` accept NumPy arrays and torch tensors alike (the exported ONNX graph uses the
same functions: a gather along V, subtraction and concatenation; NumPy takes an equivalent faster
path). ``centre`` and ``align_view``
are NumPy (they run in the data stages and in the server before the model).
"""

from __future__ import annotations

import numpy as np

from models.skeleton import LEFT_SHOULDER, PARENTS, RIGHT_SHOULDER, SPINE_BASE, SPINE_MIDDLE

STREAMS = ("joint", "bone", "joint_motion", "bone_motion")

_PARENT_INDEX = np.array(PARENTS)


def bones(x):
    """Bone vectors ``joint[child] - joint[parent]`` for the 25 NTU bones; ``(..., C, T, V, M)``.

    The centre joint (spine shoulder) is its own parent, so its bone is zero. Absent persons (all
    zeros) give zero bones.
    """
    if isinstance(x, np.ndarray):
        return x - np.take(x, _PARENT_INDEX, axis=-2)  # 6x faster than fancy indexing here
    import torch  # only reached with tensors, so NumPy-only callers never import torch

    return x - x.index_select(-2, torch.as_tensor(_PARENT_INDEX, device=x.device))


def motion(x, lengths=None):
    """Temporal difference ``x[t + 1] - x[t]`` along T, with the last frame zero; ``(..., C, T, V, M)``.

    With ``lengths`` (one per leading index, for zero-padded stored samples of shape
    ``(N, C, T, V, M)``), frames at or after ``length - 1`` are zero, so the padding does not create
    a jump back to the origin.
    """
    if not isinstance(x, np.ndarray):
        if lengths is not None:
            raise TypeError("motion(lengths=...) is for NumPy sample blocks")
        import torch

        diff = x[..., 1:, :, :] - x[..., :-1, :, :]
        return torch.cat([diff, torch.zeros_like(x[..., :1, :, :])], dim=-3)
    out = np.zeros_like(x)
    np.subtract(x[..., 1:, :, :], x[..., :-1, :, :], out=out[..., :-1, :, :])
    if lengths is not None:
        for i, length in enumerate(lengths):  # N, C, T, V, M: zero from the last valid frame on
            out[i, :, max(int(length) - 1, 0) :] = 0
    return out


def presence(x: np.ndarray) -> np.ndarray:
    """bool ``(N, T, M)``: whether person ``m`` has any non-zero joint in frame ``t``."""
    # over C on the array as it lies (elementwise over whole rows), then over V of a small (N, T, M, V)
    # copy: reducing over the two separate axes (C, V) directly took 9x as long for a served clip,
    # and transposing the whole mask first 2x as long for a block of 64 samples
    return (x != 0).any(axis=1).transpose(0, 1, 3, 2).copy().any(axis=3)


def centre(x: np.ndarray) -> np.ndarray:
    """Subtract actor 1's spine-middle joint in its first present frame from every present joint.

    ``x``: float ``(N, C, T, V, M)``. Frames where a person is absent stay zero (CTR-GCN's
    ``seq_translation``). Samples with no present frame are returned unchanged.
    """
    present = presence(x)  # N, T, M
    first = np.argmax(present[:, :, 0], axis=1)  # N: first frame of actor 1
    n = np.arange(x.shape[0])
    origin = x[n, :, first, SPINE_MIDDLE, 0]  # N, C
    origin = np.where(present[:, :, 0].any(axis=1)[:, None], origin, 0).astype(x.dtype)
    # the origin where the person is present, +0.0 where absent (x - +0.0 is x, -0.0 included), laid
    # out as x is, then one subtract: the same values as selecting between x - origin and x, 7x
    # faster for a served clip. Broadcasting over V instead was as slow as the selection: with M
    # last, NumPy's inner loops run over 2 values (a masked in-place subtract: 3x slower still).
    shift = np.where(present[:, None, :, None, :], origin[:, :, None, None, None], x.dtype.type(0))
    return x - np.repeat(shift, x.shape[3], axis=3)


def _frame_rotation(spine: np.ndarray, shoulders: np.ndarray) -> np.ndarray:
    """Rotation ``(3, 3)`` taking ``spine`` to +z and ``shoulders`` (projected off z) to +x."""
    z = spine / max(np.linalg.norm(spine), 1e-8)
    x = shoulders - np.dot(shoulders, z) * z
    norm = np.linalg.norm(x)
    if norm < 1e-8:  # shoulders parallel to the spine: any x orthogonal to z
        x = np.cross(z, [0.0, 1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0])
        norm = np.linalg.norm(x)
    x = x / norm
    y = np.cross(z, x)
    return np.stack([x, y, z])  # rows: new axes expressed in old coordinates


def align_view(x: np.ndarray) -> np.ndarray:
    """Rotate each sample so actor 1's spine (base -> middle) is along +z and its shoulders
    (left -> right, as in 2s-AGCN's ``pre_normalization``) along +x, in its first present frame.

    Apply after :func:`centre`. ``x``: float ``(N, C=3, T, V, M)``; absent frames stay zero. Unlike
    2s-AGCN's two successive rotations (the second undoes part of the first), one orthonormal frame
    is built, so the spine ends exactly on +z.
    """
    out = x.copy()
    present = presence(x)
    for i in range(x.shape[0]):
        frames = np.flatnonzero(present[i, :, 0])
        if frames.size == 0:
            continue
        pose = x[i, :, frames[0], :, 0].astype(np.float64)  # C, V
        rot = _frame_rotation(
            pose[:, SPINE_MIDDLE] - pose[:, SPINE_BASE], pose[:, RIGHT_SHOULDER] - pose[:, LEFT_SHOULDER]
        )
        rotated = np.einsum("dc,ctvm->dtvm", rot, x[i].astype(np.float64))
        out[i] = np.where(present[i][None, :, None, :], rotated, 0)
    return out


def streams(joints: np.ndarray, names, lengths=None) -> dict:
    """The requested streams (see :data:`STREAMS`) of ``joints`` ``(N, C, T, V, M)``, bones computed once."""
    unknown = [n for n in names if n not in STREAMS]
    if unknown:
        raise ValueError(f"unknown stream(s) {', '.join(unknown)}; valid: {', '.join(STREAMS)}")
    bone = bones(joints) if {"bone", "bone_motion"} & set(names) else None
    out = {}
    for name in names:
        base = joints if name.startswith("joint") else bone
        out[name] = motion(base, lengths) if name.endswith("_motion") else base
    return out


# ---- the same streams on the folded layout ``(N, C, T, V*M)`` (index ``v * M + m``) -------------
# The exported model folds its rank-5 input once and derives its streams here, so that no tensor
# above rank 4 appears in the graph (accelerators with limited operator support need that).


def fold(x):
    """torch ``(N, C, T, V, M)`` -> ``(N, C, T, V*M)``, a view."""
    n, c, t, v, m = x.shape
    return x.reshape(n, c, t, v * m)


def bones_folded(x, num_persons: int):
    """:func:`bones` of a folded tensor ``(N, C, T, V*M)``."""
    import torch

    index = (_PARENT_INDEX[:, None] * num_persons + np.arange(num_persons)[None, :]).reshape(-1)
    return x - x.index_select(-1, torch.as_tensor(index, device=x.device))


def motion_folded(x):
    """:func:`motion` (no lengths) of a folded tensor ``(N, C, T, V*M)``."""
    import torch

    diff = x[:, :, 1:] - x[:, :, :-1]
    return torch.cat([diff, torch.zeros_like(x[:, :, :1])], dim=2)
