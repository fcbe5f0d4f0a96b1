"""One synthetic ``.skeleton`` file: performance -> camera -> Kinect faults -> body records -> bytes.

Seeds are derived from the global seed and names only, so a file does not depend on which worker
makes it or in which order: the performer (body shape, style) from ``(seed, performer)``, the setup
geometry from ``(seed, setup)``, the 3D performance from ``(seed, setup, performer, replication,
action)`` (the three cameras of a performance share it), and the faults from the full file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.skeleton import NUM_JOINTS
from stages.ntu_files import MUTUAL_ACTIONS, NTU120_XSUB_TRAIN_SUBJECTS, SampleName
from stages.skeleton_text import BodyRecord, format_skeleton, parse_skeleton
from stages.synth import faults
from stages.synth.actions import program
from stages.synth.body import J, forward_kinematics, joint_orientations, rot_y, sample_shape
from stages.synth.camera import (
    clipped_edges,
    facing_yaw,
    make_setup,
    project_color,
    project_depth,
    stable_seed,
    to_camera,
)
from stages.synth.motion import pad, performer_style, personalise, time_warp, vary

if TYPE_CHECKING:
    from stages.synthesize import SynthesizeParams

MIN_FRAMES, MAX_FRAMES = 30, 300
NTU120_SUBJECTS = 106


@dataclass
class SyntheticSample:
    """One generated file and its ground truth.

    ``frames`` is exactly what is written (``data`` holds the bytes). For the ``A`` real performers
    (1, or 2 for mutual actions) over the file's ``F`` frames: ``actor_xyz`` float32 ``(A, F, 25, 3)``
    (m, camera space) and ``actor_color`` float32 ``(A, F, 25, 2)`` (colour pixels) hold exactly the
    values a parser reads back, zeros where the actor has no body; ``actor_present`` bool ``(A, F)``;
    ``clean_xyz`` float32 ``(A, F, 25, 3)`` the same joints before Kinect noise; ``actor_ids`` each
    actor's bodyIDs; ``faults`` the names of the injected faults.
    """

    name: str
    frames: list[list[BodyRecord]]
    data: bytes
    actor_xyz: np.ndarray
    actor_color: np.ndarray
    actor_present: np.ndarray
    clean_xyz: np.ndarray
    actor_ids: tuple[tuple[int, ...], ...]
    faults: tuple[str, ...]


def corpus_subjects(params: SynthesizeParams) -> list[int]:
    """The performer ids: NTU-120 X-Sub training and test subjects taken alternately (half each)."""
    train = sorted(NTU120_XSUB_TRAIN_SUBJECTS)
    test = sorted(set(range(1, NTU120_SUBJECTS + 1)) - NTU120_XSUB_TRAIN_SUBJECTS)
    mixed = [s for pair in zip(train, test, strict=False) for s in pair]
    return mixed[: params.num_subjects]


def corpus_names(params: SynthesizeParams) -> list[SampleName]:
    """Every sample of the corpus, sorted by name.

    Session ``k`` is subject ``k mod num_subjects`` in setup ``k mod num_setups + 1``; in a session the
    subject performs every class twice (replications 1 and 2), each seen by the three cameras.
    """
    subjects = corpus_subjects(params)
    names = []
    for k in range(params.num_sessions):
        subject, setup = subjects[k % len(subjects)], k % params.num_setups + 1
        for action in params.classes:
            for replication in (1, 2):
                names += [SampleName(setup, camera, subject, replication, action) for camera in (1, 2, 3)]
    return sorted(names, key=lambda n: n.name)


def _performer(seed: int, subject: int):
    rng = np.random.default_rng(stable_seed(seed, "performer", subject))
    return sample_shape(rng), performer_style(rng)


def perform(name: SampleName, params: SynthesizeParams) -> np.ndarray:
    """The 3D performance seen by all three cameras: world joints float64 ``(A, F, 25, 3)`` (m)."""
    rng = np.random.default_rng(stable_seed(params.seed, "performance", name.setup, name.performer,
                                            name.replication, name.action))  # fmt: skip
    shape, style = _performer(params.seed, name.performer)
    mutual = name.action in MUTUAL_ACTIONS
    partner = rng.choice([s for s in corpus_subjects(params) if s != name.performer] or [name.performer])
    partner_shape, partner_style = _performer(params.seed, int(partner))
    styles = (vary(style, rng), vary(partner_style, rng))
    motion = program(name.action)(styles, rng)
    before, after = int(rng.integers(2, 14)), int(rng.integers(2, 12))
    if rng.random() < 0.15:  # the operator started and stopped the recording tightly
        before, after = 0, 0
    if rng.random() < params.long_idle_rate:
        before += int(rng.integers(40, 150))
    core = motion.poses[0].frames
    after = max(after, MIN_FRAMES + 2 - core - before)
    shapes = (shape, partner_shape)
    setup = make_setup(params.seed, name.setup)
    facing = facing_yaw(name.replication) + rng.normal(0.0, 0.12)
    spot = np.array([setup.performer_offset[0], 0.0, setup.performer_offset[1]]) + rng.normal(0, 0.1, 3) * [
        1,
        0,
        1,
    ]
    side = rng.choice([-1.0, 1.0])
    out = []
    for i, pose in enumerate(motion.poses):
        pose = personalise(
            time_warp(pose, rng), styles[i], rng, mirrored=styles[i].left_handed and not mutual
        )
        local = forward_kinematics(shapes[i], pad(pose, before, after))[: MAX_FRAMES - 14]
        yaw = facing + (side * np.pi / 2 + (np.pi if i else 0.0) if mutual else 0.0)
        forward = np.array([np.sin(yaw), 0.0, np.cos(yaw)])
        out.append(local @ rot_y(np.array([yaw]))[0].T + spot - 0.5 * motion.gap * forward)
    return np.stack(out)


def _lean(xyz: np.ndarray) -> np.ndarray:
    """Kinect-like (leanX, leanY) in [-1, 1] per frame from camera-space joints ``(F, 25, 3)``."""
    spine = xyz[:, J["spine_shoulder"]] - xyz[:, J["spine_base"]]
    spine /= np.maximum(np.linalg.norm(spine, axis=-1, keepdims=True), 1e-9)
    return np.clip(np.stack([spine[:, 0], -spine[:, 2]], axis=-1) * 2.0, -1.0, 1.0)


def _records(body_id: int, xyz: np.ndarray, states: np.ndarray, frames: np.ndarray) -> dict[int, BodyRecord]:
    """Body records of one track: ``{frame: BodyRecord}`` for the given frames of ``xyz (F, 25, 3)``."""
    depth, color, quat = project_depth(xyz), project_color(xyz), joint_orientations(xyz)
    lean, edges = _lean(xyz).tolist(), clipped_edges(depth).tolist()
    out = {}
    for f in frames:
        joints = np.concatenate([xyz[f], depth[f], color[f], quat[f]], axis=-1)
        hand_states = [1 if states[f, j] == 0 else 2 for j in (J["left_hand"], J["right_hand"])]
        out[int(f)] = BodyRecord(
            body_id, joints, states[f], clipped_edges=edges[f],
            hand_left_state=hand_states[0], hand_right_state=hand_states[1], lean=tuple(lean[f]),
        )  # fmt: skip
    return out


def _plan_id_switch(present: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """``(last frame of the first id + 1, first frame of the second id)`` or None if too short."""
    frames = np.flatnonzero(present)
    if len(frames) < 40:
        return None
    cut = int(frames[int(rng.integers(int(0.3 * len(frames)), int(0.7 * len(frames))))])
    return cut, cut + int(rng.integers(0, 4))


def _noise_tracks(name: SampleName, clean: np.ndarray, rng, params, unusable: bool, faults_out: list):
    """Noise bodies: list of ``(start frame, xyz (L, 25, 3))`` in camera space."""
    total = clean.shape[1]
    tracks = []
    # An unusable file gets two ghosts, so it has more than one bodyID and the length rule applies.
    short_count = 2 if unusable else int(rng.random() < params.short_noise_rate) * int(rng.integers(1, 3))
    for _ in range(short_count):
        start = int(rng.integers(0, total - faults.SHORT_NOISE_MAX_FRAMES))
        near = clean[0, start, J["spine_middle"]] if rng.random() < 0.5 else None
        tracks.append((start, faults.short_noise_body(rng, near)))
        faults_out.append("unusable_noise_only" if unusable else "short_noise_body")
    if not unusable and rng.random() < params.furniture_rate:
        length = max(20, int(rng.uniform(0.3, 0.9) * total))
        tracks.append((int(rng.integers(0, total - length + 1)), faults.furniture_body(rng, length)))
        faults_out.append("furniture_body")
    return tracks


def generate_sample(name: SampleName, params: SynthesizeParams) -> SyntheticSample:
    """Generate one file (deterministic for ``name`` and ``params``); see :class:`SyntheticSample`."""
    rng = np.random.default_rng(stable_seed(params.seed, "file", name.name))
    clean = to_camera(perform(name, params), make_setup(params.seed, name.setup), name.camera)
    actors, total = clean.shape[0], clean.shape[1]
    found: list[str] = []
    empty, kinds = faults.empty_frames(total, rng, params.empty_frame_rate)
    found += kinds
    unusable = rng.random() < params.unusable_rate
    if unusable and rng.random() < 0.5:
        empty[:] = True
        found.append("unusable_no_bodies")
    tracks = []  # (actor or -1, body id slot, xyz, states, frames)
    for a in range(actors):
        noise = faults.jitter(total, rng, params.jitter_mm / 1000.0)
        states, offsets = faults.lost_joints(total, rng, params.inferred_rate, params.untracked_rate)
        xyz = clean[a] + noise + offsets
        present = ~empty & (not unusable)
        switch = _plan_id_switch(present, rng) if rng.random() < params.id_switch_rate else None
        if switch is None:
            tracks.append((a, xyz, states, np.flatnonzero(present)))
        else:
            frames = np.arange(total)
            tracks.append((a, xyz, states, np.flatnonzero(present & (frames < switch[0]))))
            tracks.append((a, xyz, states, np.flatnonzero(present & (frames >= switch[1]))))
            found.append("id_switch")
        found += [
            k for k, s in (("inferred_joints", 1), ("untracked_joints", 0)) if (states[present] == s).any()
        ]
    for start, xyz in _noise_tracks(name, clean, rng, params, unusable and not empty.all(), found):
        full = np.zeros((total, NUM_JOINTS, 3))
        full[start : start + len(xyz)] = xyz
        frames = np.arange(start, start + len(xyz))
        tracks.append((-1, full, np.full((total, NUM_JOINTS), 2, np.uint8), frames[~empty[frames]]))
    return _assemble(name, tracks, clean, total, actors, sorted(set(found)), rng)


def _assemble(name, tracks, clean, total, actors, found, rng) -> SyntheticSample:
    """Body records in Kinect slot order, the file bytes, and the actors' arrays as parsed back."""
    ids = faults.body_ids(len(tracks), rng)
    order = np.argsort([t[3][0] if len(t[3]) else total for t in tracks], kind="stable")
    slots = rng.permutation(6)[: len(tracks)] if len(tracks) <= 6 else np.arange(len(tracks))
    frames: list[list[BodyRecord]] = [[] for _ in range(total)]
    owner: dict[int, int] = {}
    for rank, k in enumerate(order):
        actor, xyz, states, present = tracks[k]
        records = _records(ids[rank], xyz, states, present)
        owner[ids[rank]] = actor
        for f, record in records.items():
            frames[f].append((slots[k], record))
    frames = [[r for _, r in sorted(bodies, key=lambda b: b[0])] for bodies in frames]
    data = format_skeleton(frames)
    parsed = parse_skeleton(data)
    actor_xyz = np.zeros((actors, total, NUM_JOINTS, 3), np.float32)
    actor_color = np.zeros((actors, total, NUM_JOINTS, 2), np.float32)
    present = np.zeros((actors, total), bool)
    for r, (f, body) in enumerate(zip(parsed.frame_index, parsed.body_ids, strict=True)):
        a = owner[int(body)]
        if a >= 0:
            actor_xyz[a, f], actor_color[a, f], present[a, f] = parsed.joints[r], parsed.colors[r], True
    clean_xyz = np.where(present[..., None, None], clean, 0.0).astype(np.float32)
    actor_ids = tuple(tuple(i for i in ids if owner[i] == a) for a in range(actors))
    return SyntheticSample(name.name, frames, data, actor_xyz, actor_color, present, clean_xyz, actor_ids,
                           tuple(found))  # fmt: skip
