"""One motion program per NTU action class: pure functions of the performers' styles and an rng.

A program returns a :class:`Motion`: the core of the action for one performer (or two, for the
mutual classes), before idle padding, style noise and time warps are applied (see ``sample.py``).
Durations are in frames at 30 fps and scale with the performer's tempo; angles are radians (see
:class:`stages.synth.body.Pose` for the sign conventions). ``PROGRAMS`` maps NTU action ids to programs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stages.synth.body import Pose, rest_pose
from stages.synth.motion import Style, concat, frames, keys, walk


@dataclass
class Motion:
    """The core of one performance: ``poses`` has 1 or 2 poses of equal length.

    For two performers, ``gap`` (m) is the starting distance between them; they face each other and
    each pose's ``root_z`` is measured along its performer's own forward direction.
    """

    poses: tuple[Pose, ...]
    gap: float = 0.0


Program = Callable[[tuple[Style, Style], np.random.Generator], Motion]


def animate(pose: Pose, times, **curves) -> Pose:
    """Set fields of ``pose`` to eased curves through values at ``times`` (fractions of its length)."""
    for name, values in curves.items():
        setattr(pose, name, keys(pose.frames, *zip(times, values, strict=True)))
    return pose


def both(**curves) -> dict:
    """The same curve for the left and the right side: ``both(knee=...)`` sets l_knee and r_knee."""
    return {f"{side}_{name}": values for name, values in curves.items() for side in "lr"}


# --------------------------------------------------------------------------------------------
# One-person actions


def pickup(styles, rng) -> Motion:
    """A006: bend (or squat) down, grab something from the floor with the right hand, stand up."""
    pose = rest_pose(frames(65, styles[0], rng))
    t = (0, 0.35, 0.5, 0.8, 1)
    if rng.random() < 0.35:  # squat rather than bend
        animate(pose, t, pitch=(0, 0.45, 0.45, 0, 0), trunk_pitch=(0, 0.4, 0.4, 0.1, 0),
                **both(hip_flex=(0, 1.7, 1.7, 0.1, 0), knee=(0.04, 2.1, 2.1, 0.1, 0.04)),
                r_sh_flex=(0, 1.0, 1.0, 0.5, 0.45))  # fmt: skip
    else:
        animate(pose, t, pitch=(0, 1.1, 1.1, 0, 0), trunk_pitch=(0, 0.5, 0.5, 0.1, 0),
                **both(hip_flex=(0, 1.3, 1.3, 0, 0), knee=(0.04, 0.4, 0.4, 0.05, 0.04)),
                r_sh_flex=(0, 1.6, 1.6, 0.5, 0.45))  # fmt: skip
    return Motion((animate(pose, t, r_elbow=(0.2, 0.15, 0.15, 1.3, 1.4), head_pitch=(0, 0.35, 0.35, 0.1, 0),
                           l_sh_flex=(0, 0.5, 0.5, 0, 0), l_elbow=(0.2, 0.6, 0.6, 0.2, 0.2)),))  # fmt: skip


def throw(styles, rng) -> Motion:
    """A007: right-arm overhead wind-up, fast release forwards with a step, follow-through."""
    pose = rest_pose(frames(55, styles[0], rng))
    t = (0, 0.3, 0.38, 0.44, 0.6, 1)
    return Motion((animate(
        pose, t,
        r_sh_flex=(0, 2.5, 2.4, 1.5, 0.7, 0), r_sh_abd=(0.1, 0.5, 0.5, 0.2, 0.1, 0.1),
        r_elbow=(0.2, 1.9, 1.9, 0.2, 0.3, 0.2), r_sh_rot=(0, 0.7, 0.7, 0, 0, 0),
        trunk_twist=(0, -0.35, -0.35, 0.3, 0.25, 0), trunk_pitch=(0, -0.12, -0.1, 0.35, 0.3, 0),
        l_sh_flex=(0, 0.8, 0.8, 0.3, 0.1, 0), l_hip_flex=(0, 0.3, 0.35, 0.35, 0.3, 0),
        l_knee=(0.04, 0.2, 0.25, 0.3, 0.2, 0.04),
    ),))  # fmt: skip


def sitting_down(styles, rng) -> Motion:
    """A008: lean forwards, lower the pelvis back onto a chair, settle upright with hands on thighs."""
    pose = rest_pose(frames(65, styles[0], rng))
    t = (0, 0.15, 0.55, 0.75, 1)
    depth = rng.uniform(0.35, 0.45)  # how far back the chair is
    return Motion((animate(
        pose, t,
        trunk_pitch=(0, 0.15, 0.6, 0.15, 0.1), root_z=(0, 0, -0.75 * depth, -depth, -depth),
        **both(hip_flex=(0, 0.1, 1.2, 1.5, 1.5), knee=(0.04, 0.15, 1.2, 1.55, 1.55),
               sh_flex=(0, 0, 0.5, 0.45, 0.4), elbow=(0.2, 0.2, 0.5, 0.7, 0.8)),
        head_pitch=(0, 0, 0.2, 0.05, 0.05),
    ),))  # fmt: skip


def standing_up(styles, rng) -> Motion:
    """A009: exactly :func:`sitting_down` played backwards (only the temporal order differs)."""
    motion = sitting_down(styles, rng)
    return Motion(tuple(p.map(lambda a: a[::-1]) for p in motion.poses), motion.gap)


def clapping(styles, rng) -> Motion:
    """A010: hands up in front of the chest, 3-7 claps, hands down."""
    style = styles[0]
    period, claps = frames(11, style, rng, 0.15), int(rng.integers(3, 8))
    n = period * claps
    apart = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / period)  # 0 = hands together
    clap = rest_pose(n)
    for side in "lr":
        setattr(clap, f"{side}_sh_flex", np.full(n, 0.8))
        setattr(clap, f"{side}_elbow", np.full(n, 1.45))
        setattr(clap, f"{side}_sh_rot", -0.85 + 0.65 * apart)
        setattr(clap, f"{side}_sh_abd", 0.12 + 0.25 * apart)
    up = animate(
        rest_pose(frames(14, style, rng)),
        (0, 1),
        **both(sh_flex=(0, 0.8), elbow=(0.2, 1.45), sh_rot=(0, -0.85), sh_abd=(0.1, 0.12)),
    )
    down = up.map(lambda a: a[::-1])
    return Motion((concat(up, clap, down),))


def hand_waving(styles, rng) -> Motion:
    """A023: right arm up at the side, forearm up, 2-5 waves of the forearm, arm down."""
    style = styles[0]
    period, waves = frames(14, style, rng, 0.15), int(rng.integers(2, 6))
    n = period * waves
    wave = rest_pose(n)
    swing = np.sin(2 * np.pi * np.arange(n) / period)
    wave.r_sh_abd = np.full(n, 1.3) + 0.05 * swing
    wave.r_sh_flex = np.full(n, 0.3)
    wave.r_sh_rot = np.full(n, 1.45)
    wave.r_elbow = 1.25 + 0.4 * swing
    wave.head_yaw = np.full(n, -0.1)
    up = animate(rest_pose(frames(16, style, rng)), (0, 1), r_sh_abd=(0.1, 1.3), r_sh_flex=(0, 0.3),
                 r_sh_rot=(0, 1.45), r_elbow=(0.2, 1.25), head_yaw=(0, -0.1))  # fmt: skip
    return Motion((concat(up, wave, up.map(lambda a: a[::-1])),))


def kicking(styles, rng) -> Motion:
    """A024: right leg swings back, kicks forwards, returns; arms balance, trunk leans back."""
    pose = rest_pose(frames(50, styles[0], rng))
    t = (0, 0.3, 0.45, 0.55, 0.75, 1)
    return Motion((animate(
        pose, t,
        r_hip_flex=(0, -0.35, 1.1, 1.0, 0.2, 0), r_knee=(0.04, 1.2, 0.15, 0.3, 0.3, 0.04),
        r_ankle=(0, 0, 0.3, 0.3, 0, 0), l_knee=(0.04, 0.2, 0.15, 0.15, 0.1, 0.04),
        trunk_pitch=(0, 0.1, -0.25, -0.2, 0, 0),
        **both(sh_abd=(0.1, 0.3, 0.5, 0.4, 0.2, 0.1)),
        l_sh_flex=(0, 0, 0.4, 0.3, 0.1, 0), r_sh_flex=(0, 0.2, -0.4, -0.3, 0, 0),
    ),))  # fmt: skip


def hopping(styles, rng) -> Motion:
    """A026: lift the left foot, 3-6 hops on the right foot, put the foot down."""
    style = styles[0]
    period, hops = frames(13, style, rng, 0.1), int(rng.integers(3, 7))
    n = period * hops
    bounce = np.abs(np.sin(np.pi * np.arange(n) / period))
    hop = rest_pose(n)
    hop.lift = rng.uniform(0.06, 0.12) * bounce**1.2
    hop.l_hip_flex, hop.l_knee = np.full(n, 0.6), np.full(n, 1.4)
    hop.r_knee = 0.1 + 0.35 * (1 - bounce)
    hop.r_hip_flex = 0.05 + 0.2 * (1 - bounce)
    for side in "lr":
        setattr(hop, f"{side}_sh_abd", 0.35 + 0.1 * bounce)
        setattr(hop, f"{side}_elbow", np.full(n, 0.8))
    raise_leg = animate(
        rest_pose(frames(12, style, rng)),
        (0, 1),
        l_hip_flex=(0, 0.6),
        l_knee=(0.04, 1.4),
        r_knee=(0.04, 0.45),
        r_hip_flex=(0, 0.25),
        **both(sh_abd=(0.1, 0.35), elbow=(0.2, 0.8)),
    )
    return Motion((concat(raise_leg, hop, raise_leg.map(lambda a: a[::-1])),))


def jump_up(styles, rng) -> Motion:
    """A027: crouch with arms back, jump 0.2-0.4 m with arms up, land in a crouch, stand (1-2 jumps)."""
    style = styles[0]
    parts = []
    for _ in range(int(rng.integers(1, 3))):
        crouch = animate(
            rest_pose(frames(16, style, rng)),
            (0, 1),
            trunk_pitch=(0, 0.6),
            **both(hip_flex=(0, 0.9), knee=(0.04, 1.4), sh_flex=(0, -0.7), elbow=(0.2, 0.3)),
        )
        flight = rest_pose(frames(15, style, rng, 0.05))
        u = np.linspace(0, 1, flight.frames)
        flight.lift = 4 * rng.uniform(0.2, 0.4) * u * (1 - u)
        animate(flight, (0, 0.3, 0.7, 1), trunk_pitch=(0.6, 0, 0, 0.2),
                **both(hip_flex=(0.9, 0.05, 0.1, 0.5), knee=(1.4, 0.1, 0.2, 0.7),
                       sh_flex=(-0.7, 2.5, 2.3, 1.0), elbow=(0.3, 0.2, 0.2, 0.3)))  # fmt: skip
        land = animate(rest_pose(frames(22, style, rng)), (0, 0.3, 1), trunk_pitch=(0.2, 0.45, 0),
                       **both(hip_flex=(0.5, 0.8, 0), knee=(0.7, 1.2, 0.04),
                              sh_flex=(1.0, 0.5, 0), elbow=(0.3, 0.3, 0.2)))  # fmt: skip
        parts += [crouch, flight, land]
    return Motion((concat(*parts),))


def pointing(styles, rng) -> Motion:
    """A031: raise the straight right arm towards a target, hold, lower it."""
    pose = rest_pose(frames(60, styles[0], rng))
    flex, abd = rng.uniform(1.35, 1.75), rng.uniform(0.0, 0.5)
    return Motion(
        (
            animate(
                pose,
                (0, 0.25, 0.75, 1),
                r_sh_flex=(0, flex, flex, 0),
                r_sh_abd=(0.1, abd, abd, 0.1),
                r_elbow=(0.2, 0.05, 0.05, 0.2),
                head_yaw=(0, -0.3 * abd, -0.3 * abd, 0),
            ),
        )
    )


def salute(styles, rng) -> Motion:
    """A038: stand straight, bring the right hand's fingertips to the brow, hold, drop the arm."""
    pose = rest_pose(frames(60, styles[0], rng))
    t = (0, 0.25, 0.7, 0.9, 1)
    return Motion((animate(
        pose, t,
        r_sh_abd=(0.1, 1.5, 1.5, 0.1, 0.1), r_sh_flex=(0, 0.4, 0.4, 0, 0), r_sh_rot=(0, 0.75, 0.75, 0, 0),
        r_elbow=(0.2, 2.5, 2.5, 0.2, 0.2),
        trunk_pitch=(0, -0.05, -0.05, 0, 0), head_pitch=(0, -0.08, -0.08, 0, 0),
        l_sh_abd=(0.1, 0.03, 0.03, 0.1, 0.1), l_elbow=(0.2, 0.05, 0.05, 0.2, 0.2),
    ),))  # fmt: skip


def falling(styles, rng) -> Motion:
    """A043: knees buckle, the body topples forwards onto the hands and lies prone on the floor."""
    pose = rest_pose(frames(75, styles[0], rng))
    t = (0, 0.15, 0.38, 0.55, 0.65, 1)
    reach = rng.uniform(0.3, 0.5)
    return Motion((animate(
        pose, t,
        pitch=(0, 0, 0, 0.8, 1.45, 1.45), trunk_pitch=(0, 0.15, 0.45, 0.4, 0.1, 0.1),
        root_z=(0, 0, 0.1, 0.5 * reach, reach, reach),
        **both(hip_flex=(0, 0.2, 0.6, 0.4, 0.05, 0.05), knee=(0.04, 0.4, 1.3, 0.8, 0.15, 0.15),
               sh_flex=(0, 0.3, 1.0, 2.0, 2.5, 2.5), elbow=(0.2, 0.3, 0.4, 0.5, 0.9, 0.9),
               sh_abd=(0.1, 0.2, 0.3, 0.4, 0.5, 0.5)),
        head_pitch=(0, 0.2, 0.2, -0.3, -0.6, -0.6),
    ),))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Two-person (mutual) actions: poses[0] is the performer doing the action, poses[1] the partner.


def _pair(styles, rng, base: float) -> tuple[Pose, Pose]:
    n = frames(base, styles[0], rng)
    return rest_pose(n), rest_pose(n)


def punching(styles, rng) -> Motion:
    """A050: step in, 1-3 right punches towards the partner's head; the partner recoils each time."""
    hits = int(rng.integers(1, 4))
    actor, partner = _pair(styles, rng, 30 + 22 * hits)
    times, strike, recoil = [0.0], [0.0], [0.0]
    for k in range(hits):
        start = (0.25 + 0.7 * k / hits) if k else 0.25
        times += [start - 0.08, start, start + 0.1]
        strike += [-1.0, 1.0, -1.0]
        recoil += [0.0, 0.0, 1.0]
    times.append(1.0)
    strike.append(0.0)
    recoil.append(0.0)
    s = keys(actor.frames, *zip(times, strike, strict=True))
    wind, hit = np.clip(-s, 0, 1), np.clip(s, 0, 1)
    guard = keys(actor.frames, (0, 0), (0.2, 1), (0.9, 1), (1, 0))
    actor.r_sh_flex, actor.r_elbow = 0.9 * wind + 1.55 * hit, 0.2 + 1.8 * wind - 0.1 * hit
    actor.r_sh_abd, actor.trunk_twist = 0.1 + 0.25 * wind, -0.2 * wind + 0.25 * hit
    actor.trunk_pitch, actor.l_sh_flex, actor.l_elbow = 0.15 * hit, 0.9 * guard, 0.2 + 1.8 * guard
    actor.root_z = keys(actor.frames, (0, 0), (0.2, 0.15), (0.9, 0.15), (1, 0.1))
    actor.l_hip_flex = keys(actor.frames, (0, 0), (0.15, 0.35), (0.25, 0.1), (1, 0))
    r = keys(partner.frames, *zip(times, recoil, strict=True))
    partner.trunk_pitch, partner.head_pitch = -0.25 * r, -0.3 * r
    partner.root_z = -0.08 * np.cumsum(np.maximum(np.diff(r, prepend=0), 0))
    animate(partner, (0, 0.25, 0.9, 1), **both(sh_flex=(0, 0.6, 0.6, 0), elbow=(0.2, 1.6, 1.6, 0.2)))
    return Motion((actor, partner), gap=rng.uniform(0.8, 0.95))


def pushing(styles, rng) -> Motion:
    """A052: both hands push the partner's chest; the partner staggers back with arms out."""
    actor, partner = _pair(styles, rng, 60)
    t = (0, 0.25, 0.4, 0.55, 0.8, 1)
    animate(actor, t, root_z=(0, 0.1, 0.35, 0.45, 0.45, 0.45), trunk_pitch=(0, 0.1, 0.3, 0.25, 0.05, 0),
            **both(sh_flex=(0, 1.2, 1.45, 1.2, 0.2, 0), elbow=(0.2, 1.5, 0.3, 0.4, 0.3, 0.2),
                   sh_abd=(0.1, 0.15, 0.15, 0.15, 0.1, 0.1)),
            l_hip_flex=(0, 0.3, 0.4, 0.1, 0, 0))  # fmt: skip
    hit = int(0.4 * partner.frames)
    walk(partner, hit, int(0.8 * partner.frames), period=22, distance=rng.uniform(0.4, 0.6), direction=-1)
    animate(partner, t, trunk_pitch=(0, 0, -0.1, -0.3, -0.05, 0), head_pitch=(0, 0, -0.1, -0.25, 0, 0),
            **both(sh_abd=(0.1, 0.1, 0.3, 0.8, 0.3, 0.1), elbow=(0.2, 0.2, 0.4, 0.6, 0.3, 0.2)))  # fmt: skip
    return Motion((actor, partner), gap=rng.uniform(0.75, 0.9))


def hugging(styles, rng) -> Motion:
    """A055: both walk up to each other, wrap their arms around each other, hold, release and step back."""
    actor, partner = _pair(styles, rng, 80)
    gap = rng.uniform(1.2, 1.5)
    n = actor.frames
    t = (0, 0.3, 0.42, 0.75, 0.88, 1)
    for pose, lean in ((actor, 0.2), (partner, 0.15)):
        walk(pose, 0, int(0.35 * n), period=30, distance=(gap - 0.36) / 2)
        walk(pose, int(0.8 * n), n, period=26, distance=0.2, direction=-1)
        animate(pose, t, **both(sh_flex=(0, 0.2, 1.35, 1.35, 0.3, 0), sh_abd=(0.1, 0.3, 0.6, 0.6, 0.2, 0.1),
                                sh_rot=(0, 0, -0.9, -0.9, 0, 0), elbow=(0.2, 0.5, 1.7, 1.7, 0.4, 0.2)),
                trunk_pitch=(0, 0, lean, lean, 0, 0), head_yaw=(0, 0, 0.4, 0.4, 0, 0))  # fmt: skip
    return Motion((actor, partner), gap=gap)


def handshaking(styles, rng) -> Motion:
    """A058: step towards each other, join right hands, 3-5 shakes, let go and step back."""
    actor, partner = _pair(styles, rng, 75)
    gap = rng.uniform(1.1, 1.3)
    n, shakes, period = actor.frames, int(rng.integers(3, 6)), 8
    shake = np.zeros(n)
    start = int(0.35 * n)
    stop = min(n, start + shakes * period)
    shake[start:stop] = np.sin(2 * np.pi * np.arange(stop - start) / period)
    t = (0, 0.3, 0.4, 0.75, 0.9, 1)
    for pose in (actor, partner):
        walk(pose, 0, int(0.3 * n), period=26, distance=(gap - 0.75) / 2)
        animate(pose, t, r_sh_flex=(0, 0.4, 0.6, 0.6, 0.2, 0), r_elbow=(0.2, 0.6, 0.3, 0.3, 0.3, 0.2),
                r_sh_rot=(0, 0, -0.73, -0.73, 0, 0), r_sh_abd=(0.1, 0, -0.14, -0.14, 0.1, 0.1),
                head_pitch=(0, 0.1, 0.1, 0.1, 0, 0))  # fmt: skip
        pose.r_elbow = pose.r_elbow + 0.14 * shake
    return Motion((actor, partner), gap=gap)


def walking_towards(styles, rng) -> Motion:
    """A059: the two start 2.4-3.0 m apart and walk up to each other, stopping about 0.9 m apart."""
    gap = rng.uniform(2.4, 3.0)
    period = frames(32, styles[0], rng)
    walking = round(period * rng.uniform(2.0, 2.6))
    actor, partner = rest_pose(walking + 12), rest_pose(walking + 12)
    for pose, delay in ((actor, 0), (partner, int(rng.integers(0, 6)))):
        walk(pose, delay, walking + min(delay, 4), period=period, distance=(gap - rng.uniform(0.8, 1.0)) / 2)
    return Motion((actor, partner), gap=gap)


def walking_apart(styles, rng) -> Motion:
    """A060: the two stand about 0.9 m apart facing each other, turn around and walk away."""
    gap = rng.uniform(0.8, 1.0)
    period = frames(32, styles[0], rng)
    turn, walking = frames(16, styles[0], rng), round(period * rng.uniform(2.0, 2.6))
    poses = []
    for side in (1.0, -1.0):
        pose = rest_pose(turn + walking + 6)
        pose.yaw = np.concatenate([keys(turn, (0, 0), (1, side * np.pi)), np.full(walking + 6, side * np.pi)])
        pose.l_knee[:turn] = 0.04 + 0.3 * np.abs(np.sin(2 * np.pi * np.arange(turn) / turn))
        pose.r_knee[:turn] = 0.04 + 0.3 * np.abs(np.cos(2 * np.pi * np.arange(turn) / turn))
        walk(pose, turn, turn + walking, period=period, distance=rng.uniform(0.8, 1.0))
        poses.append(pose)
    return Motion(tuple(poses), gap=gap)


# NTU action id -> program; the one place a class is chosen.
PROGRAMS: dict[int, Program] = {
    6: pickup, 7: throw, 8: sitting_down, 9: standing_up, 10: clapping, 23: hand_waving, 24: kicking,
    26: hopping, 27: jump_up, 31: pointing, 38: salute, 43: falling,
    50: punching, 52: pushing, 55: hugging, 58: handshaking, 59: walking_towards, 60: walking_apart,
}  # fmt: skip


def program(action: int) -> Program:
    """The motion program of an NTU action id; a ``ValueError`` lists the implemented ids."""
    if action not in PROGRAMS:
        raise ValueError(f"no motion program for action {action}; implemented: {sorted(PROGRAMS)}")
    return PROGRAMS[action]
