"""One clip from outside the pipeline (a client, a file upload, a stream) into the model's input.

The server and the export stage use these functions, and they are built from the pipeline's own
pieces, so a clip gets exactly the treatment a stored sample gets:

- :func:`joints_from_skeleton_file`: a raw NTU ``.skeleton`` file -> actors, by the parse stage's
  parser and denoiser (:mod:`stages.skeleton_text`, :mod:`stages.denoise`);
- :func:`joints_from_clip`: a client's array ``(T, 25, 3)`` (one person) or ``(M, T, 25, 3)``
  (M <= 2) -> the pipeline layout ``(3, T, 25, 2)``, validated;
- :func:`prepare`: normalisation (:func:`stages.features.normalise`) then the test-time sampling
  (:func:`stages.dataset.sample_clips`) -> ``(K, 3, window, 25, 2)`` float32 clips, whose scores are
  averaged.

Every rejection is a :class:`ClipError` (a :class:`~stages.errors.RejectedInput`) whose message says
what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.skeleton import MAX_COORDINATE_M, MAX_PERSONS, NUM_JOINTS
from stages.dataset import LoaderParams, sample_clips
from stages.denoise import COMPLETE, select_actors
from stages.errors import RejectedInput
from stages.features import normalise
from stages.skeleton_text import parse_skeleton


class ClipError(RejectedInput):
    """A clip the model cannot take."""


@dataclass(frozen=True)
class ClipLimits:
    """What a clip may be: frames in ``[min_frames, max_frames]``, coordinates within ``max_abs`` metres."""

    min_frames: int = 1
    max_frames: int = 1200  # NTU's longest sample has ~ 300 frames at 30 fps (10 s); 40 s here
    max_abs: float = MAX_COORDINATE_M


def joints_from_clip(
    clip, limits: ClipLimits = ClipLimits(), *, drop_empty_frames: bool = True
) -> np.ndarray:
    """Validate a client clip ``(T, 25, 3)`` or ``(M, T, 25, 3)`` and return float32 ``(3, T', 25, 2)``.

    Missing persons are zero (the pipeline's convention for an absent actor). As the parse stage
    prepares a file: frames in which nobody is present (all zero: the padding of a fixed-length
    array, say) are dropped, so ``T' <= T``, and a body sent in the second slot with the first
    empty is actor 1 (the clip is centred on actor 1).

    ``drop_empty_frames=False`` is for actors the parse stage has already selected
    (:func:`joints_from_skeleton_file`, transposed to ``(M, T, 25, 3)``): they are only validated,
    every frame and slot kept as they are, so ``T' = T`` as in the store (parse keeps the all-zero
    frames of a file with a single body).
    """
    try:
        x = np.asarray(clip, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ClipError("bad_shape", f"the clip is not a rectangular array of numbers ({exc})") from None
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ClipError(
            "bad_shape",
            f"expected (T, {NUM_JOINTS}, 3) or (M, T, {NUM_JOINTS}, 3), got an array of shape {x.shape}",
        )
    persons, frames, joints, coords = x.shape
    if joints != NUM_JOINTS or coords != 3:
        raise ClipError(
            "bad_shape",
            f"each frame needs {NUM_JOINTS} joints of 3 coordinates (x, y, z in metres); "
            f"got {joints} joints of {coords}",
        )
    if not 1 <= persons <= MAX_PERSONS:
        raise ClipError("bad_shape", f"1 to {MAX_PERSONS} persons per clip, got {persons}")
    if frames < limits.min_frames:
        raise ClipError("empty", f"the clip has {frames} frames; at least {limits.min_frames} needed")
    if frames > limits.max_frames:
        raise ClipError("too_long", f"the clip has {frames} frames; at most {limits.max_frames} accepted")
    finite = np.isfinite(x)
    if not finite.all():
        p, t, j, _ = np.argwhere(~finite)[0]
        raise ClipError(
            "not_finite",
            f"{int((~finite).sum())} values are NaN or infinite (first: person {p}, frame {t}, joint {j})",
        )
    biggest = float(np.abs(x).max())
    if biggest > limits.max_abs:
        raise ClipError(
            "out_of_range", f"a coordinate is {biggest:.3g} m from the camera; at most {limits.max_abs} m"
        )
    # what the model gets, before telling where a body is: 1e-300 is a body in float64, not in float32
    x = x.astype(np.float32)
    if not x.any():
        raise ClipError("empty", "every joint of every frame is zero: no body in the clip")
    present = x.any(axis=(2, 3))  # M, T
    if drop_empty_frames and not present[0].any():  # only the second slot holds a body: it is actor 1
        x, present = x[::-1], present[::-1]
    someone = present.any(axis=0)  # T
    if drop_empty_frames and not someone.all():
        x = x[:, someone]
        frames = x.shape[1]
        if frames < limits.min_frames:
            raise ClipError(
                "empty", f"the clip has {frames} frames with a body; at least {limits.min_frames} needed"
            )
    out = np.zeros((3, frames, NUM_JOINTS, MAX_PERSONS), dtype=np.float32)
    out[..., :persons] = x.transpose(3, 1, 2, 0)
    return out


def joints_from_skeleton_file(data: bytes, denoise: str = COMPLETE) -> np.ndarray:
    """A raw NTU ``.skeleton`` file's selected actors, float32 ``(3, T, 25, 2)``, as the parse stage
    selects them (``denoise``: its ``parse.denoise`` mode). Raises
    :class:`~stages.errors.RejectedInput` (the parser's or denoiser's reason). To check them against
    the service's limits, hand them to :func:`joints_from_clip` with ``drop_empty_frames=False``
    (its default would drop the all-zero frames the parse stage keeps)."""
    return select_actors(parse_skeleton(data), denoise).joints


def prepare(joints: np.ndarray, loader: LoaderParams, view_align: bool = False) -> np.ndarray:
    """Raw camera-space joints ``(3, T, 25, 2)`` -> the model's clips ``(K, 3, window, 25, 2)`` float32.

    The features stage's normalisation, then the loader's test-time sampling (centre crop-resize, or
    ``test_clips`` uniform clips).
    """
    normalised = normalise(joints[None], view_align)[0]
    return np.ascontiguousarray(sample_clips(normalised, loader, train=False), dtype=np.float32)
