"""Performer styles and the building blocks of motion programs: keyframes, gait, warps and idling.

All functions are pure: randomness comes only from the ``np.random.Generator`` passed in. Times are in
frames at the Kinect's 30 frames per second; angles in radians; distances in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.synth.body import FIELD_NAMES, REST, TRANSLATIONS, Pose, mirror, rest_pose


@dataclass(frozen=True)
class Style:
    """How one performer moves.

    ``duration`` multiplies every action's duration (> 1 is slower), ``amplitude`` scales how far the
    joints move away from the rest pose, ``left_handed`` mirrors one-person actions, ``posture`` holds
    constant angle offsets ``((field, rad), ...)``, ``sway`` the idle sway (m).
    """

    duration: float
    amplitude: float
    left_handed: bool
    posture: tuple[tuple[str, float], ...]
    sway: float


_POSTURE_SD = {"trunk_pitch": 0.06, "trunk_roll": 0.03, "head_pitch": 0.1, "head_yaw": 0.06,
               "l_sh_abd": 0.05, "r_sh_abd": 0.05, "l_elbow": 0.08, "r_elbow": 0.08,
               "l_hip_abd": 0.03, "r_hip_abd": 0.03, "l_knee": 0.03, "r_knee": 0.03}  # fmt: skip


def performer_style(rng: np.random.Generator) -> Style:
    """A performer's habitual style: tempo 0.8-1.25, amplitude 0.85-1.15, ~12 % left-handed."""
    posture = tuple((name, float(rng.normal(0.0, sd))) for name, sd in _POSTURE_SD.items())
    return Style(
        duration=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
        amplitude=float(rng.uniform(0.85, 1.15)),
        left_handed=bool(rng.random() < 0.12),
        posture=posture,
        sway=float(rng.uniform(0.004, 0.02)),
    )


def vary(style: Style, rng: np.random.Generator) -> Style:
    """The same performer on another take: tempo and amplitude within about +-8 %, posture +-0.02."""
    return Style(
        duration=style.duration * float(rng.uniform(0.92, 1.08)),
        amplitude=style.amplitude * float(rng.uniform(0.94, 1.06)),
        left_handed=style.left_handed,
        posture=tuple((name, value + float(rng.normal(0.0, 0.02))) for name, value in style.posture),
        sway=style.sway,
    )


def frames(base: float, style: Style, rng: np.random.Generator, spread: float = 0.1) -> int:
    """A duration in frames: ``base`` (frames at tempo 1) times the style's tempo and a random factor."""
    return max(2, round(base * style.duration * rng.uniform(1 - spread, 1 + spread)))


def keys(n: int, *points: tuple[float, float]) -> np.ndarray:
    """A float64 ``(n,)`` curve through ``(t, value)`` keyframes, ``t`` in [0, 1]; cosine-eased."""
    times = np.array([p[0] for p in points], dtype=np.float64)
    values = np.array([p[1] for p in points], dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)
    seg = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    span = np.maximum(times[seg + 1] - times[seg], 1e-9)
    u = np.clip((t - times[seg]) / span, 0.0, 1.0)
    eased = 0.5 - 0.5 * np.cos(np.pi * u)
    return values[seg] + (values[seg + 1] - values[seg]) * eased


def concat(*poses: Pose) -> Pose:
    """Poses played one after the other."""
    return Pose(**{name: np.concatenate([getattr(p, name) for p in poses]) for name in FIELD_NAMES})


def hold(pose: Pose, n: int, at: int = -1) -> Pose:
    """``n`` frames of frame ``at`` of ``pose``."""
    return pose.map(lambda a: np.full(n, a[at]))


def walk(pose: Pose, start: int, stop: int, period: float, distance: float, direction: float = 1.0) -> None:
    """Overwrite frames ``[start, stop)`` of ``pose`` with a walking gait, in place.

    One gait cycle (two steps) takes ``period`` frames; the performer covers ``distance`` metres along
    their current heading (``direction`` +1 forwards, -1 backwards), ramping in and out over a quarter
    cycle, and stays where they arrive afterwards.
    """
    n = stop - start
    i = np.arange(n, dtype=np.float64)
    ramp = max(2.0, period / 4)
    env = np.clip(np.minimum(i + 1, n - i) / ramp, 0.0, 1.0)
    phase = 2 * np.pi * i / period
    speed = distance * env / env.sum()
    s = slice(start, stop)
    travel = np.cumsum(speed) * direction
    x0, z0 = pose.root_x[start], pose.root_z[start]
    pose.root_x[s] = x0 + travel * np.sin(pose.yaw[s])
    pose.root_z[s] = z0 + travel * np.cos(pose.yaw[s])
    pose.root_x[stop:] = pose.root_x[stop - 1]
    pose.root_z[stop:] = pose.root_z[stop - 1]
    swing = np.sin(phase) * env
    pose.l_hip_flex[s] = 0.38 * swing
    pose.r_hip_flex[s] = -0.38 * swing
    pose.l_knee[s] = 0.08 + 0.6 * np.maximum(0.0, np.cos(phase)) ** 1.5 * env
    pose.r_knee[s] = 0.08 + 0.6 * np.maximum(0.0, -np.cos(phase)) ** 1.5 * env
    pose.l_sh_flex[s] = -0.3 * swing
    pose.r_sh_flex[s] = 0.3 * swing
    pose.trunk_twist[s] = 0.06 * swing


def personalise(pose: Pose, style: Style, rng: np.random.Generator, mirrored: bool) -> Pose:
    """Apply a style to a program's pose: amplitude, handedness, posture, smooth angle noise, sway."""
    values = {}
    n = pose.frames
    offsets = dict(style.posture)
    for name in FIELD_NAMES:
        value = getattr(pose, name)
        if name not in TRANSLATIONS:
            rest = REST.get(name, 0.0)
            value = rest + style.amplitude * (value - rest) + offsets.get(name, 0.0)
            value = value + smooth_noise(n, rng, sd=0.025, knot=20)
        values[name] = value
    out = Pose(**values)
    if mirrored:
        out = mirror(out)
    t = np.arange(n) / 30.0
    phase = rng.uniform(0, 2 * np.pi, size=2)
    out.root_x = out.root_x + style.sway * np.sin(2 * np.pi * t / 4.0 + phase[0])
    out.trunk_pitch = out.trunk_pitch + 0.012 * np.sin(2 * np.pi * t / 3.5 + phase[1])
    return out


def smooth_noise(n: int, rng: np.random.Generator, sd: float, knot: int) -> np.ndarray:
    """Low-frequency noise float64 ``(n,)``: Gaussian values every ``knot`` frames, interpolated."""
    count = n // knot + 2
    return np.interp(np.arange(n) / knot, np.arange(count), rng.normal(0.0, sd, size=count))


def time_warp(pose: Pose, rng: np.random.Generator, strength: float = 0.15) -> Pose:
    """Resample a pose along a smooth monotone time warp (same length, locally faster or slower)."""
    n = pose.frames
    if n < 3:
        return pose
    rate = np.exp(smooth_noise(n, rng, sd=strength, knot=15))
    t = np.concatenate([[0.0], np.cumsum(rate[:-1])])
    t = t / t[-1] * (n - 1)
    grid = np.arange(n, dtype=np.float64)
    return pose.map(lambda a: np.interp(t, grid, a))


def pad(pose: Pose, before: int, after: int) -> Pose:
    """Idle standing (the first and last poses held) before and after a program."""
    parts = [hold(pose, before, 0)] if before else []
    parts.append(pose)
    if after:
        parts.append(hold(pose, after, -1))
    return concat(*parts)


def still(n: int) -> Pose:
    """A relaxed standing pose of ``n`` frames (for partners waiting)."""
    return rest_pose(n)
