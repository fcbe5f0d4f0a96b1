"""Body selection and denoising of one parsed file: the standard NTU preparation.

Reproduces CTR-GCN's ``get_raw_skes_data.py`` + ``get_raw_denoised_data.py`` (the preparation pyskl
and most later work reuse), so the tensors match the public pipelines:

1. Frames with no body are dropped; records are grouped by bodyID in order of first appearance.
   As in the reference, a body's frames are placed contiguously from its first frame.
2. With more than one bodyID: drop bodies seen in 11 frames or fewer; then (while more than one is
   left) drop bodies whose frames are "noisy by spread" (x-range > 0.8 y-range) in a ratio >= 0.69754,
   and lower the motion of the others to that of their non-noisy frames; rank the rest by motion
   (sum over x, y, z of the variance of their joints). Actor 1 = most motion; each later body joins
   actor 1 if its interval does not overlap actor 1's, else actor 2 if it does not overlap actor
   2's, else it is discarded. Frames where both actors are empty are dropped.
3. A file with a single bodyID keeps it whole.

A file from which no body survives is rejected with the reason (the reference crashes on it).

One difference by default (``denoise="complete"``): the reference starts actor 2's interval at a
virtual ``[0, 0]`` and widens it with ``min(start, start2)``, so actor 2 always "starts" at frame 0 and
a later-ranked body that overlaps actor 1 and lies wholly before actor 2's first body is discarded as
overlapping both actors. Typically that body is the first half of a second person whose Kinect id
changed mid-sequence, when the later id moves more. Here actor 2's interval starts empty, so such a
body joins actor 2 (both halves of that person are kept); everything else matches the reference frame
for frame. ``denoise="reference"`` reproduces the reference in that case too (the ``parse.denoise``
param), for tensors identical to the public pipelines'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.skeleton import NUM_JOINTS
from stages.errors import RejectedInput
from stages.skeleton_text import RawSkeleton

NOISE_LENGTH_THRESHOLD = 11  # bodies seen in <= 11 frames are noise
NOISE_SPREAD_RATIO = 0.8  # a frame is noisy when x-range > 0.8 * y-range
NOISE_SPREAD_FRACTION = 0.69754  # a body is noise when this fraction of its frames is noisy
MAX_ACTORS = 2
COMPLETE, REFERENCE = "complete", "reference"  # how actor 2's interval starts (module docstring)
DENOISE_MODES = (COMPLETE, REFERENCE)


class DenoiseError(RejectedInput):
    """A file whose bodies cannot give a usable sample."""


@dataclass
class Selection:
    """The selected actors of one file.

    ``joints`` float32 ``(3, T, 25, 2)`` camera-space metres and ``colors`` float32
    ``(2, T, 25, 2)`` colour-frame pixels, zero where an actor is absent; T = kept frames.
    """

    joints: np.ndarray
    colors: np.ndarray
    bodies_seen: int
    actors_kept: int
    dropped_by_length: int
    dropped_by_spread: int
    dropped_by_overlap: int


@dataclass
class _Body:
    body_id: int
    records: np.ndarray  # int (n,): record indices into the RawSkeleton arrays
    start: int  # first valid frame
    motion: float
    last: int | None = None  # last valid frame where it is seen (only for ``true_spans``)

    @property
    def end(self) -> int:  # last frame of its interval: the reference's contiguous one by default
        return self.start + len(self.records) - 1 if self.last is None else self.last


def _motion(joints: np.ndarray) -> float:
    # float32 reduction over a contiguous (n * 25, 3) array, as the reference computes it.
    return float(np.sum(np.var(np.ascontiguousarray(joints).reshape(-1, 3), axis=0)))


def _check_unique_per_frame(raw: RawSkeleton) -> None:
    pairs = raw.frame_index.astype(np.uint64) * np.uint64(2**32) + (raw.body_ids % np.uint64(2**32))
    if len(np.unique(pairs)) == len(pairs):
        return
    ids_per_frame: dict[tuple[int, int], int] = {}
    for frame, body in zip(raw.frame_index.tolist(), raw.body_ids.tolist(), strict=True):
        if (frame, body) in ids_per_frame:
            raise DenoiseError("duplicate_body_id", f"bodyID {body} appears twice in frame {frame + 1}")
        ids_per_frame[(frame, body)] = 1


def _group_bodies(raw: RawSkeleton, true_spans: bool = False) -> tuple[list[_Body], int]:
    _check_unique_per_frame(raw)
    valid = raw.body_counts > 0
    if raw.body_ids.min() == raw.body_ids.max():  # the common case: one bodyID, all frames
        return [_Body(int(raw.body_ids[0]), np.arange(len(raw.body_ids)), 0, 0.0)], int(valid.sum())
    valid_index = np.cumsum(valid) - 1  # frame -> index among the frames that have bodies
    ids, first = np.unique(raw.body_ids, return_index=True)
    bodies = []
    for body_id, _ in sorted(zip(ids.tolist(), first.tolist(), strict=True), key=lambda p: p[1]):
        records = np.flatnonzero(raw.body_ids == np.uint64(body_id))
        start = int(valid_index[raw.frame_index[records[0]]])
        last = int(valid_index[raw.frame_index[records[-1]]]) if true_spans else None
        bodies.append(_Body(body_id, records, start, 0.0, last))
    return bodies, int(valid.sum())


def _spread_noisy(joints: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: frames whose x-range exceeds 0.8 times their y-range; ``joints`` ``(n, 25, 3)``."""
    x_range = np.ptp(joints[:, :, 0], axis=1).astype(np.float64)
    y_range = np.ptp(joints[:, :, 1], axis=1).astype(np.float64)
    return x_range > NOISE_SPREAD_RATIO * y_range


def _denoise(raw: RawSkeleton, bodies: list[_Body]) -> tuple[list[_Body], int, int]:
    """Length and spread rules, then the motion ranking. Returns (ranked bodies, by length, by spread)."""
    joints = raw.joints
    for body in bodies:
        body.motion = _motion(joints[body.records])
    kept = [b for b in bodies if len(b.records) > NOISE_LENGTH_THRESHOLD]
    by_length = len(bodies) - len(kept)
    if not kept:
        raise DenoiseError(
            "denoised_away",
            f"all {len(bodies)} bodies are noise: none is seen in more than {NOISE_LENGTH_THRESHOLD} frames",
        )
    if len(kept) == 1:
        return kept, by_length, 0
    by_spread = 0
    for body in list(kept):
        if len(kept) == 1:
            break
        body_joints = joints[body.records]
        noisy = _spread_noisy(body_joints)
        if not noisy.any():
            continue
        if noisy.sum() / len(noisy) >= NOISE_SPREAD_FRACTION:
            kept.remove(body)
            by_spread += 1
        else:
            body.motion = min(body.motion, _motion(body_joints[~noisy]))
    if len(kept) == 1:
        return kept, by_length, by_spread
    return sorted(kept, key=lambda b: b.motion, reverse=True), by_length, by_spread


def real_bodies(raw: RawSkeleton) -> list[np.ndarray]:
    """Record indices (into ``raw``'s arrays) of every body the length and spread rules keep.

    The people actually in the scene, for labelling video frames: unlike :func:`select_actors` it
    keeps every such body (not only two actors) and leaves the frames where they are. Raises
    :class:`DenoiseError` when nothing is kept.
    """
    if raw.body_ids.size == 0:
        raise DenoiseError("no_body", f"no body in any of the {raw.declared_frames} frames")
    bodies, _ = _group_bodies(raw)
    if len(bodies) == 1:
        return [bodies[0].records]
    kept, _, _ = _denoise(raw, bodies)
    return [b.records for b in sorted(kept, key=lambda b: b.start)]


def _place(out: np.ndarray, raw_values: np.ndarray, body: _Body, actor: int) -> None:
    # out: T, 25, 7, M; the reference writes a body's frames contiguously from its first frame.
    out[body.start : body.end + 1, :, :, actor] = raw_values[body.records]


@dataclass
class _Assignment:
    bodies: list[_Body]  # every body of the file, in order of first appearance
    num_frames: int  # frames with at least one body
    actors: list[list[_Body]]  # MAX_ACTORS lists: the bodies placed in each actor's slot
    dropped_by_length: int = 0
    dropped_by_spread: int = 0
    dropped_by_overlap: int = 0


def _assign(raw: RawSkeleton, true_spans: bool = False, denoise: str = COMPLETE) -> _Assignment:
    """Steps 2 and 3 of the module docstring: which bodies become actor 1 and actor 2; with
    ``true_spans`` a body's interval runs from its first to its last frame (not the reference's
    contiguous run from its first frame), for bodies that leave and come back. ``denoise``: one of
    :data:`DENOISE_MODES` (the module docstring)."""
    if denoise not in DENOISE_MODES:
        raise ValueError(f"denoise must be one of {DENOISE_MODES}, got {denoise!r}")
    if raw.body_ids.size == 0:
        raise DenoiseError("no_body", f"no body in any of the {raw.declared_frames} frames")
    bodies, num_frames = _group_bodies(raw, true_spans)
    if len(bodies) == 1:
        return _Assignment(bodies, num_frames, [[bodies[0]], []])
    ranked, by_length, by_spread = _denoise(raw, bodies)
    actor1, rest = ranked[0], ranked[1:]
    out = _Assignment(bodies, num_frames, [[actor1], []], by_length, by_spread)
    start1, end1 = actor1.start, actor1.end
    # Actor 2's interval: empty, or the reference's virtual [0, 0] (see the module docstring).
    interval2: tuple[int, int] | None = (0, 0) if denoise == REFERENCE else None
    for body in rest:
        if min(end1, body.end) - max(start1, body.start) <= 0:  # no overlap with actor 1
            out.actors[0].append(body)
            start1, end1 = min(body.start, start1), max(body.end, end1)
        elif interval2 is None or min(interval2[1], body.end) - max(interval2[0], body.start) <= 0:
            out.actors[1].append(body)
            interval2 = (
                (body.start, body.end)
                if interval2 is None
                else (min(body.start, interval2[0]), max(body.end, interval2[1]))
            )
        else:
            out.dropped_by_overlap += 1
    return out


def actor_records(raw: RawSkeleton, true_spans: bool = False) -> list[np.ndarray]:
    """Record indices (into ``raw``'s arrays, ascending) of actor 1 and actor 2 (empty when there is
    none): the records :func:`select_actors` places, without moving any frame. For labelling each frame
    of a video with its actors (the video path's people are bodies tracked by :mod:`serving.video`).

    ``true_spans``: bodies may leave and come back (a tracker's ids, unlike a Kinect file's bodies,
    are kept across missed frames), so a body's interval and frames are the ones it is seen in; by
    default they are the reference's contiguous run from its first frame. Always the ``"complete"``
    mode: the reference's quirk is about Kinect ids, and a track split in two keeps both halves."""
    out = []
    for bodies in _assign(raw, true_spans).actors:
        placed: dict[int, int] = {}  # output frame -> record; a later body overwrites, as _place does
        for body in bodies:
            frames = raw.frame_index[body.records].tolist() if true_spans else range(body.start, body.end + 1)
            placed.update(zip(frames, body.records.tolist(), strict=True))
        out.append(np.array(sorted(placed.values()), np.int64))
    return out


def select_actors(raw: RawSkeleton, denoise: str = COMPLETE) -> Selection:
    """Denoise the bodies of ``raw`` and return at most two actors (see the module docstring;
    ``denoise``: ``"complete"`` or ``"reference"``)."""
    a = _assign(raw, denoise=denoise)
    values = raw.values  # R, 25, 7
    out = np.zeros((a.num_frames, NUM_JOINTS, values.shape[2], MAX_ACTORS), dtype=np.float32)
    for actor, bodies in enumerate(a.actors):
        for body in bodies:
            _place(out, values, body, actor)
    if len(a.bodies) > 1:
        # Drop frames where both actors are empty (the reference's remove_missing_frames).
        xyz_sum = out[:, :, 0:3, :].sum(axis=(1, 2, 3))
        out = out[xyz_sum != 0]
        if out.shape[0] == 0:
            raise DenoiseError("denoised_away", "no frame keeps a body after denoising")
    out = out.transpose(2, 0, 1, 3)  # 7, T, 25, M
    return Selection(
        joints=np.ascontiguousarray(out[0:3]),
        colors=np.ascontiguousarray(out[5:7]),
        bodies_seen=len(a.bodies),
        actors_kept=1 + bool(a.actors[1]),
        dropped_by_length=a.dropped_by_length,
        dropped_by_spread=a.dropped_by_spread,
        dropped_by_overlap=a.dropped_by_overlap,
    )
