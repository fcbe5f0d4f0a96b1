"""Drawing the synthetic performers as solid bodies in a procedural room: RGB frames for pose estimation.

Pure drawing, no file I/O. The input is what a ``.skeleton`` file holds for the real actors: camera-space
joints ``(A, F, 25, 3)`` (m, Kinect camera space: ``x`` to the sensor's left, ``y`` up, ``z`` away) and
a presence mask ``(A, F)``. Joints are projected with exactly :func:`stages.synth.camera.project_color`
(the 1920x1080 colour frame) and scaled by ``width / 1920``, so a file's ``colorX``/``colorY`` times the
scale are the joints' pixel positions in the rendered frame.

A body is a set of capsules whose axes run through the joints (bone ``a -> b`` with a radius in metres,
``radius_px = f * scale * r / z``), torso polygons between the shoulders and hips, and a head ellipse
centred on the head joint; so every joint centre lies on its own body's pixels unless a nearer body
covers it. Parts are drawn far to near (painter's algorithm, per part: a near arm covers the torso,
the nearer performer covers the other). Clothing and skin come from a :class:`Look`, the room, light
and sensor noise from a :class:`Scene`; everything is deterministic for the seeds given.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.skeleton import NUM_JOINTS
from stages.synth.body import J
from stages.synth.camera import COLOR_BASELINE, COLOR_CX, COLOR_CY, COLOR_F, COLOR_SIZE, project_color

SHIFT = 4  # cv2 fixed-point bits: coordinates are drawn with 1/16 px precision
ONE = 1 << SHIFT
MIN_THICKNESS = 3  # px; a capsule at least this thick covers the pixel its axis joint rounds to
NOISE_PAD = 64  # the per-video noise field is this much larger than a frame; frames take shifted views


def frame_size(width: int) -> tuple[int, int]:
    """``(width, height)`` of a render of the 16:9 colour frame at ``width`` px (height rounded)."""
    return width, round(width * COLOR_SIZE[1] / COLOR_SIZE[0])


@dataclass(frozen=True)
class Geometry:
    """Where the floor is, in Kinect camera space (m): points ``X`` on it satisfy ``normal . X = offset``.

    ``normal`` is the unit up direction; ``offset`` is minus the camera's height; ``centre`` is the
    performance area's centre on the floor (the wall is placed behind it).
    """

    normal: tuple[float, float, float] = (0.0, 1.0, 0.0)
    offset: float = -1.1
    centre: tuple[float, float, float] = (0.0, -1.1, 3.0)


@dataclass(frozen=True)
class Look:
    """One performer's appearance: BGR colours (0-255 floats) and garment cut.

    ``sleeve`` is the fraction of the upper arm a sleeve covers (1 = long sleeves, forearms covered too);
    ``leg`` the fraction of the thigh the trousers cover (1 = long trousers); ``build`` scales every
    limb radius.
    """

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    trousers: tuple[float, float, float]
    shoes: tuple[float, float, float]
    sleeve: float
    leg: float
    build: float


@dataclass(frozen=True, eq=False)
class Scene:
    """A video's fixed parts: the lit background uint8 ``(H, W, 3)`` BGR, the light's colour gain ``(3,)``
    (applied to the bodies too), the floor geometry, the sensor noise (sd in grey levels) and its seed."""

    background: np.ndarray
    gain: np.ndarray
    geometry: Geometry
    noise_sd: float
    noise_seed: int

    @property
    def width(self) -> int:
        return self.background.shape[1]

    @property
    def height(self) -> int:
        return self.background.shape[0]

    @property
    def scale(self) -> float:
        """Render pixels per colour-frame pixel (``width / 1920``)."""
        return self.width / COLOR_SIZE[0]


# --------------------------------------------------------------------------------------------
# Appearance

_SKIN_RGB = ((255, 224, 196), (241, 194, 167), (224, 172, 138), (198, 134, 103), (161, 110, 82),
             (120, 80, 60), (90, 60, 45))  # fmt: skip
_HAIR_RGB = ((20, 18, 16), (55, 38, 28), (105, 72, 45), (165, 125, 80), (205, 175, 125), (125, 120, 115))
_TROUSERS_RGB = ((45, 65, 105), (70, 95, 140), (25, 25, 28), (90, 90, 95), (185, 165, 125), (95, 70, 50))
_SHOES_RGB = ((20, 20, 20), (235, 235, 230), (95, 60, 35), (120, 120, 125))


def _bgr(rgb) -> tuple[float, float, float]:
    return float(rgb[2]), float(rgb[1]), float(rgb[0])


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return _bgr([255.0 * c for c in colorsys.hsv_to_rgb(h % 1.0, s, v)])


def _pick(rng: np.random.Generator, palette, spread: float = 12.0) -> tuple[float, float, float]:
    base = np.asarray(palette[int(rng.integers(len(palette)))], float)
    return _bgr(np.clip(base + rng.normal(0.0, spread, 3), 0, 255))


def make_look(seed: int) -> Look:
    """A random performer appearance, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    if rng.random() < 0.25:  # white, black or grey shirts are common
        shirt = _hsv(0.0, 0.0, float(rng.choice([0.12, 0.45, 0.7, 0.93])))
    else:
        shirt = _hsv(rng.random(), rng.uniform(0.25, 0.9), rng.uniform(0.3, 0.95))
    return Look(
        skin=_pick(rng, _SKIN_RGB, 8.0),
        hair=_pick(rng, _HAIR_RGB, 8.0),
        shirt=shirt,
        trousers=_pick(rng, _TROUSERS_RGB),
        shoes=_pick(rng, _SHOES_RGB),
        sleeve=1.0 if rng.random() < 0.55 else float(rng.uniform(0.3, 0.6)),
        leg=1.0 if rng.random() < 0.88 else float(rng.uniform(0.4, 0.7)),
        build=float(np.clip(rng.normal(1.0, 0.08), 0.85, 1.2)),
    )


# --------------------------------------------------------------------------------------------
# The room


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Low-frequency noise float32 ``(height, width)`` with about unit amplitude."""
    low = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells)).astype(np.float32)
    return cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)


def _view_rays(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour-camera centre ``(3,)`` and the ray through every render pixel centre ``(H, W, 3)``."""
    scale = width / COLOR_SIZE[0]
    u = np.arange(width) / scale
    v = np.arange(height) / scale
    rays = np.empty((height, width, 3))
    rays[..., 0] = ((u - COLOR_CX) / COLOR_F)[None, :]
    rays[..., 1] = (-(v - COLOR_CY) / COLOR_F)[:, None]
    rays[..., 2] = 1.0
    return np.array([-COLOR_BASELINE, 0.0, 0.0]), rays


def _wall_items(rng, image, wall, a, h, a_range) -> None:
    """Doors, cabinets, posters, windows and boards on the wall, in wall coordinates (m), in place."""
    kinds = {  # width, height, bottom (m)
        "door": ((0.85, 0.95), (2.0, 2.1), (0.0, 0.0)),
        "cabinet": ((0.6, 1.8), (0.7, 1.3), (0.0, 0.0)),
        "poster": ((0.4, 1.0), (0.5, 1.0), (1.0, 1.5)),
        "window": ((0.8, 1.6), (0.8, 1.3), (0.9, 1.1)),
        "board": ((1.2, 2.4), (0.9, 1.2), (0.85, 1.0)),
    }
    names = sorted(kinds)
    placed: list[tuple[float, float, float, float]] = []
    wanted = int(rng.integers(2, 7))
    for _ in range(4 * wanted):  # rejection sampling: items do not overlap
        kind = names[int(rng.integers(len(names)))]
        (w0, w1), (h0, h1), (b0, b1) = kinds[kind]
        width, tall, bottom = rng.uniform(w0, w1), rng.uniform(h0, h1), rng.uniform(b0, b1)
        left = rng.uniform(a_range[0] - 0.5 * width, a_range[1] - 0.5 * width)
        box = (left - 0.1, left + width + 0.1, bottom - 0.1, bottom + tall + 0.1)
        if any(box[0] < p[1] and p[0] < box[1] and box[2] < p[3] and p[2] < box[3] for p in placed):
            continue
        placed.append(box)
        ia = (a - left) / width
        ih = (h - bottom) / tall
        inside = wall & (ia >= 0) & (ia < 1) & (ih >= 0) & (ih < 1)
        frame = 0.05 / width, 0.05 / tall
        border = inside & ((ia < frame[0]) | (ia > 1 - frame[0]) | (ih < frame[1]) | (ih > 1 - frame[1]))
        if kind == "window":
            colour = np.array(_hsv(0.55 + rng.normal(0, 0.03), rng.uniform(0.05, 0.25), 0.97))
            bars = inside & ((np.abs(ia - 0.5) < frame[0] / 2) | (np.abs(ih - 0.5) < frame[1] / 2))
            border |= bars
            edge = np.array(_hsv(0, 0, rng.uniform(0.8, 0.95)))
        elif kind == "board":
            colour, edge = np.array(_hsv(0, 0, rng.uniform(0.88, 0.97))), np.array(_hsv(0, 0, 0.3))
        elif kind == "poster":
            colour = np.array(_hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.35, 0.95)))
            edge = np.array(_hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.9)))
            border |= inside & (np.abs(ih - rng.uniform(0.3, 0.7)) < rng.uniform(0.05, 0.2))
        else:  # door, cabinet: wood or painted
            colour = np.array(_hsv(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.8)))
            if kind == "cabinet":
                border |= inside & ((ih * int(rng.integers(2, 5))) % 1.0 < 0.04)
            edge = colour * 0.6
        image[inside] = colour
        image[border] = edge
        if len(placed) == wanted:
            break


def _floor_texture(rng, fa: np.ndarray, fb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base colour ``(3,)`` and per-pixel brightness ``(...)`` of the floor at floor coordinates (m)."""
    table = rng.uniform(0.85, 1.15, 97)
    kind = int(rng.integers(3))
    if kind == 0:  # wooden planks
        colour = np.array(_hsv(rng.uniform(0.05, 0.11), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.75)))
        width, length = rng.uniform(0.12, 0.22), rng.uniform(0.8, 2.0)
        row = np.floor(fa / width).astype(np.int64)
        col = np.floor(fb / length + table[row % 97] * 3.0).astype(np.int64)
        shade = table[(row * 7 + col * 13) % 97]
        seam = ((fa / width) % 1.0 < 0.05) | (((fb / length + table[row % 97] * 3.0) % 1.0) < 0.01)
        return colour, np.where(seam, 0.6, shade)
    if kind == 1:  # tiles
        colour = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.45, 0.9)))
        size = rng.uniform(0.3, 0.6)
        grout = ((fa / size) % 1.0 < 0.03) | ((fb / size) % 1.0 < 0.03)
        checker = (np.floor(fa / size) + np.floor(fb / size)) % 2 * rng.uniform(0.0, 0.12)
        return colour, np.where(grout, 0.75, 1.0 - checker)
    colour = np.array(_hsv(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.25, 0.6)))  # carpet
    return colour, np.ones_like(fa)


def make_background(seed: int, width: int, geometry: Geometry = Geometry()) -> np.ndarray:
    """A procedural room as seen by the colour camera: float32 ``(H, W, 3)`` BGR in 0-255, unlit.

    A wall stands 1.2-3.0 m behind the area centre, facing the camera, with doors, cabinets, posters,
    windows and boards; the floor (planks, tiles or carpet) and the ceiling are intersected ray by ray,
    so the floor/wall line and the textures are in the camera's perspective. Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    height = frame_size(width)[1]
    up = _unit(geometry.normal)
    ahead = _unit(np.array([0.0, 0.0, 1.0]) - up[2] * up)  # horizontal viewing direction
    across = np.cross(up, ahead)
    origin, rays = _view_rays(width, height)
    wall_distance = float(np.dot(geometry.centre, ahead)) + rng.uniform(1.2, 3.0)
    t_wall = (wall_distance - origin @ ahead) / np.maximum(rays @ ahead, 1e-6)
    down = rays @ up
    t_floor = np.where(down < -1e-6, (geometry.offset - origin @ up) / np.minimum(down, -1e-6), np.inf)
    on_floor = t_floor < t_wall
    hit_wall = origin + t_wall[..., None] * rays
    a, h = hit_wall @ across, hit_wall @ up - geometry.offset
    ceiling = ~on_floor & (h > rng.uniform(2.6, 3.2))
    wall = ~on_floor & ~ceiling

    wall_colour = np.array(_hsv(rng.random(), rng.uniform(0.03, 0.3), rng.uniform(0.55, 0.9)))
    image = np.empty((height, width, 3), np.float32)
    image[:] = wall_colour
    a_range = (float(a[wall].min()), float(a[wall].max())) if wall.any() else (-2.0, 2.0)
    _wall_items(rng, image, wall, a, h, a_range)
    image[wall & (h < rng.uniform(0.06, 0.12))] = wall_colour * rng.uniform(0.5, 0.8)  # skirting board
    spot = rng.uniform(-2.0, 2.0)
    light = np.clip(1.0 - 0.12 * ((a - spot) / 3.0) ** 2 + 0.05 * (h - 1.3), 0.7, 1.15)
    image *= np.where(wall, light, 1.0)[..., None]
    image[ceiling] = np.array(_hsv(0.1, 0.03, rng.uniform(0.75, 0.95)))

    hit_floor = origin + np.where(on_floor, t_floor, 0.0)[..., None] * rays
    fa, fb = hit_floor @ across, hit_floor @ ahead
    floor_colour, floor_shade = _floor_texture(rng, fa, fb)
    floor_shade = floor_shade * np.clip(1.05 - 0.04 * (fb - float(np.dot(geometry.centre, ahead))), 0.8, 1.1)
    image[on_floor] = floor_colour * floor_shade[on_floor][:, None]

    blotches = 1.0 + 0.05 * _smooth_noise(rng, width, height, 12)
    image *= blotches[..., None]
    image += rng.normal(0.0, 2.5, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.7)  # soften hard procedural edges, like a camera lens
    return np.clip(image, 0, 255)


def make_scene(width: int, *, room_seed: int, light_seed: int, geometry: Geometry = Geometry(),
               noise_sd: float = 2.0) -> Scene:  # fmt: skip
    """The background (room from ``room_seed``) lit by a light from ``light_seed``.

    The light is a brightness (0.75-1.15) and colour gain (about +-8 % per channel) shared by the room
    and the bodies, and a vignette (up to 35 % darker corners) on the room. ``light_seed`` also seeds the
    per-frame sensor noise (Gaussian, ``noise_sd`` grey levels).
    """
    rng = np.random.default_rng(light_seed)
    gain = rng.uniform(0.75, 1.15) * np.clip(1.0 + rng.normal(0.0, 0.05, 3), 0.9, 1.1)
    room = make_background(room_seed, width, geometry)
    height = room.shape[0]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius2 = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / ((width / 2) ** 2 + (height / 2) ** 2)
    vignette = 1.0 - rng.uniform(0.0, 0.35) * radius2
    lit = room * vignette[..., None] * gain.astype(np.float32)
    background = np.clip(np.round(lit), 0, 255).astype(np.uint8)
    return Scene(background, gain, geometry, float(noise_sd), int(rng.integers(2**63)))


# --------------------------------------------------------------------------------------------
# Bodies

# Limb capsules (joint a, joint b, radius in m, slot); the slot picks the garment (see _limb_colours).
_LIMBS = (
    (J["left_shoulder"], J["left_elbow"], 0.052, "upper_arm"),
    (J["right_shoulder"], J["right_elbow"], 0.052, "upper_arm"),
    (J["left_elbow"], J["left_wrist"], 0.04, "forearm"),
    (J["right_elbow"], J["right_wrist"], 0.04, "forearm"),
    (J["left_wrist"], J["left_hand"], 0.034, "hand"),
    (J["right_wrist"], J["right_hand"], 0.034, "hand"),
    (J["left_hand"], J["left_hand_tip"], 0.022, "hand"),
    (J["right_hand"], J["right_hand_tip"], 0.022, "hand"),
    (J["left_hand"], J["left_thumb"], 0.016, "hand"),
    (J["right_hand"], J["right_thumb"], 0.016, "hand"),
    (J["left_hip"], J["left_knee"], 0.075, "thigh"),
    (J["right_hip"], J["right_knee"], 0.075, "thigh"),
    (J["left_knee"], J["left_ankle"], 0.055, "shin"),
    (J["right_knee"], J["right_ankle"], 0.055, "shin"),
    (J["left_ankle"], J["left_foot"], 0.045, "foot"),
    (J["right_ankle"], J["right_foot"], 0.045, "foot"),
)
# Torso capsules drawn over the torso polygons: spine, clavicles (shirt), pelvis (trousers).
_SPINE = (
    (J["spine_base"], J["spine_middle"], 0.11),
    (J["spine_middle"], J["spine_shoulder"], 0.115),
    (J["spine_shoulder"], J["left_shoulder"], 0.065),
    (J["spine_shoulder"], J["right_shoulder"], 0.065),
)
_PELVIS = ((J["spine_base"], J["left_hip"], 0.08), (J["spine_base"], J["right_hip"], 0.08))  # fmt: skip
_TORSO_JOINTS = (J["spine_base"], J["spine_middle"], J["spine_shoulder"], J["left_shoulder"],
                 J["right_shoulder"], J["left_hip"], J["right_hip"])  # fmt: skip
_NECK = ((J["spine_shoulder"], J["neck"], 0.045), (J["neck"], J["head"], 0.045))
HEAD_RADII = (0.085, 0.112)  # m: half width, half height of the head ellipse around the head joint
_LIGHT = (-0.447, -0.894)  # unit image direction the light comes from (up, slightly left)


def _tones(colour, gain) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(outline, base, highlight) BGR tuples of a material under the scene light."""
    base = np.clip(np.asarray(colour) * gain, 0, 255)
    light = np.clip(base * 1.18 + 18.0, 0, 255)
    return tuple((base * 0.55).tolist()), tuple(base.tolist()), tuple(light.tolist())


def _palette(look: Look, gain: np.ndarray) -> dict[str, tuple]:
    return {k: _tones(getattr(look, k), gain) for k in ("skin", "hair", "shirt", "trousers", "shoes")}


def _fixed(p) -> tuple[int, int]:
    return round(p[0] * ONE), round(p[1] * ONE)


class _Canvas:
    """The frame and (optionally) the label map, drawn together with the same geometry; points are
    ``(x, y)`` float pixel tuples, radii floats in px."""

    def __init__(self, frame: np.ndarray, labels: np.ndarray | None):
        self.frame, self.labels, self.value = frame, labels, 0

    def capsule(self, p, q, radius: float, tones, shade: bool = True) -> None:
        """A capsule of ``radius`` around segment ``p -> q``, outlined and lit when thick enough."""
        outline, base, light = tones
        thickness = max(MIN_THICKNESS, round(2.0 * radius))
        a, b = _fixed(p), _fixed(q)
        if self.labels is not None:
            cv2.line(self.labels, a, b, self.value, thickness, cv2.LINE_8, SHIFT)
        if thickness < 5:
            cv2.line(self.frame, a, b, base, thickness, cv2.LINE_AA, SHIFT)
            return
        if shade:
            cv2.line(self.frame, a, b, outline, thickness, cv2.LINE_AA, SHIFT)
            thickness -= 2 * max(1, round(0.15 * thickness))
        cv2.line(self.frame, a, b, base, thickness, cv2.LINE_8, SHIFT)
        if thickness >= 6:  # a lighter band shifted towards the light, across the limb
            ax, ay = q[0] - p[0], q[1] - p[1]
            length = math.hypot(ax, ay)
            ax, ay = (ax / length, ay / length) if length > 1e-6 else (0.0, 0.0)
            along = _LIGHT[0] * ax + _LIGHT[1] * ay
            ox, oy = (_LIGHT[0] - along * ax) * 0.3 * radius, (_LIGHT[1] - along * ay) * 0.3 * radius
            band = max(2, round(0.35 * thickness))
            cv2.line(self.frame, _fixed((p[0] + ox, p[1] + oy)), _fixed((q[0] + ox, q[1] + oy)), light, band,
                     cv2.LINE_AA, SHIFT)  # fmt: skip

    def polygon(self, points: np.ndarray, tones) -> None:
        """A filled convex hull of ``points`` ``(K, 2)`` px with a dark outline."""
        hull = cv2.convexHull(np.round(points * ONE).astype(np.int32))
        if self.labels is not None:
            cv2.fillConvexPoly(self.labels, hull, self.value, cv2.LINE_8, SHIFT)
        cv2.fillConvexPoly(self.frame, hull, tones[1], cv2.LINE_8, SHIFT)
        cv2.polylines(self.frame, [hull], True, tones[0], 2, cv2.LINE_AA, SHIFT)

    def ellipse(self, centre, axes, angle: float, colour, label: bool = True, outline=None) -> None:
        """A filled ellipse (``axes`` half-lengths in px, ``angle`` degrees of the first axis)."""
        c = _fixed(centre)
        ax = (max(ONE, round(axes[0] * ONE)), max(ONE, round(axes[1] * ONE)))
        if label and self.labels is not None:
            cv2.ellipse(self.labels, c, ax, angle, 0, 360, self.value, -1, cv2.LINE_8, SHIFT)
        cv2.ellipse(self.frame, c, ax, angle, 0, 360, colour, -1, cv2.LINE_AA, SHIFT)
        if outline is not None:
            cv2.ellipse(self.frame, c, ax, angle, 0, 360, outline, 1, cv2.LINE_AA, SHIFT)


def _limb_colours(slot: str, look: Look, tones: dict) -> tuple[tuple, tuple | None, float]:
    """(colour of the whole limb, colour of the garment covering its first part or None, fraction)."""
    if slot == "upper_arm" and look.sleeve < 1.0:
        return tones["skin"], tones["shirt"], look.sleeve
    if slot == "thigh" and look.leg < 1.0:
        return tones["skin"], tones["trousers"], look.leg
    garment = {
        "upper_arm": "shirt",
        "forearm": "shirt" if look.sleeve >= 1.0 else "skin",
        "thigh": "trousers",
        "shin": "trousers" if look.leg >= 1.0 else "skin",
        "foot": "shoes",
        "hand": "skin",
    }
    return tones[garment[slot]], None, 1.0


class _Body:
    """One actor in one frame: projected joints as float tuples and the drawing groups of its parts."""

    def __init__(self, px: np.ndarray, xyz: np.ndarray, look: Look, tones: dict, f_scale: float):
        self.p = [tuple(p) for p in px.tolist()]
        self.xyz = xyz
        self.z = xyz[:, 2].tolist()
        self.look, self.tones = look, tones
        self.f_scale = f_scale  # px per metre at 1 m depth
        self.k = f_scale * look.build  # limb radii scale with the performer's build

    def radius(self, a: int, b: int, metres: float) -> float:
        return self.k * metres / max(0.5 * (self.z[a] + self.z[b]), 0.3)

    def groups(self) -> list[tuple[float, object]]:
        """``(depth m, draw(canvas))`` for every part: limbs, torso, neck and head."""
        z = self.z
        out = [(0.5 * (z[a] + z[b]), self._limb(a, b, r, slot)) for a, b, r, slot in _LIMBS]
        out.append((sum(z[j] for j in _TORSO_JOINTS) / len(_TORSO_JOINTS), self._torso))
        out.append((0.5 * (z[J["neck"]] + z[J["head"]]), self._head))
        return out

    def _limb(self, a: int, b: int, metres: float, slot: str):
        whole, cover, fraction = _limb_colours(slot, self.look, self.tones)
        r = self.radius(a, b, metres)
        pa, pb = self.p[a], self.p[b]

        def draw(canvas: _Canvas) -> None:
            canvas.capsule(pa, pb, r, whole)
            if cover is not None:
                end = (pa[0] + fraction * (pb[0] - pa[0]), pa[1] + fraction * (pb[1] - pa[1]))
                canvas.capsule(pa, end, r * 1.1, cover)

        return draw

    def _torso(self, canvas: _Canvas) -> None:
        """Shirt polygon and capsules from the shoulders to the waist, trousers from the waist down."""
        px = np.array(self.p)
        ls, rs, lh, rh = (px[J[n]] for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip"))
        waist_l, waist_r = lh + 0.22 * (ls - lh), rh + 0.22 * (rs - rh)
        shirt, trousers = self.tones["shirt"], self.tones["trousers"]
        canvas.polygon(np.stack([ls, rs, waist_r, waist_l, px[J["spine_middle"]]]), shirt)
        for a, b, metres in _SPINE:
            canvas.capsule(self.p[a], self.p[b], self.radius(a, b, metres), shirt, shade=False)
        canvas.polygon(np.stack([waist_l, waist_r, rh, lh, px[J["spine_base"]]]), trousers)
        for a, b, metres in _PELVIS:
            canvas.capsule(self.p[a], self.p[b], self.radius(a, b, metres), trousers, shade=False)

    def _head(self, canvas: _Canvas) -> None:
        """Neck, then a hair ellipse centred on the head joint, then the face on the side it faces."""
        skin = self.tones["skin"]
        for a, b, metres in _NECK:
            canvas.capsule(self.p[a], self.p[b], self.radius(a, b, metres), skin)
        (cx, cy), (nx, ny) = self.p[J["head"]], self.p[J["neck"]]
        ux, uy = cx - nx, cy - ny
        length = math.hypot(ux, uy)
        ux, uy = (ux / length, uy / length) if length > 1e-6 else (0.0, -1.0)
        angle = math.degrees(math.atan2(uy, ux))
        depth = max(self.z[J["head"]], 0.3)
        rx, ry = self.f_scale * HEAD_RADII[0] / depth, self.f_scale * HEAD_RADII[1] / depth
        hair = self.tones["hair"]
        canvas.ellipse((cx, cy), (ry, rx), angle, hair[1], outline=hair[0])
        # The body's forward direction is left x up (body frame: x left, y up, z forward).
        x = self.xyz
        left = x[J["left_shoulder"]] - x[J["right_shoulder"]]
        up = x[J["spine_shoulder"]] - x[J["spine_base"]]
        fx, fy, fz = (left[1] * up[2] - left[2] * up[1], left[2] * up[0] - left[0] * up[2],
                      left[0] * up[1] - left[1] * up[0])  # fmt: skip
        norm = max(math.sqrt(fx * fx + fy * fy + fz * fz), 1e-9)
        if fz / norm > 0.3:  # seen from behind: hair only
            return
        towards = min(max(-fz / norm, 0.0), 1.0)
        shift = 0.45 * rx * (1.0 - towards) / norm
        face = (cx - 0.18 * ry * ux + shift * fx, cy - 0.18 * ry * uy - shift * fy)
        canvas.ellipse(face, (0.82 * ry, rx * (0.45 + 0.4 * towards)), angle, skin[1])
        if towards > 0.5 and rx >= 4.0:
            for s in (-0.33 * rx, 0.33 * rx):
                eye = (face[0] + 0.1 * ry * ux - s * uy, face[1] + 0.1 * ry * uy + s * ux)
                canvas.ellipse(eye, (0.1 * rx, 0.1 * rx), 0.0, (40.0, 35.0, 35.0), label=False)


_RING = np.stack([np.cos(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
                  np.sin(np.linspace(0, 2 * np.pi, 16, endpoint=False))], axis=1)  # fmt: skip


def _shadow(frame: np.ndarray, xyz: np.ndarray, geometry: Geometry, scale: float) -> None:
    """Darken the floor under a body: a soft disc of 0.35 m radius around its foot point, in place."""
    up = _unit(geometry.normal)
    centre = xyz[[J["left_ankle"], J["right_ankle"], J["spine_base"]]].mean(axis=0)
    centre = centre - (np.dot(centre, up) - geometry.offset) * up
    ahead = _unit(np.array([0.0, 0.0, 1.0]) - up[2] * up)
    across = np.array([up[1] * ahead[2] - up[2] * ahead[1], up[2] * ahead[0] - up[0] * ahead[2],
                       up[0] * ahead[1] - up[1] * ahead[0]])  # fmt: skip
    ring = centre + 0.35 * (_RING[:, :1] * across + 0.6 * _RING[:, 1:] * ahead)
    if ring[:, 2].min() < 0.3:
        return
    points = project_color(ring) * scale
    height, width = frame.shape[:2]
    sigma = max(1.0, 0.1 * float(np.ptp(points[:, 0])))
    margin = int(np.ceil(3 * sigma))
    x0, y0 = (np.floor(points.min(axis=0)).astype(int) - margin).tolist()
    x1, y1 = (np.ceil(points.max(axis=0)).astype(int) + margin + 1).tolist()
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return
    # Blurred at a quarter of the resolution: a wide blur at full size costs more than the whole body.
    small = np.zeros(((y1 - y0 + 3) // 4, (x1 - x0 + 3) // 4), np.uint8)
    quarter = np.round((points - [x0, y0]) * (ONE / 4)).astype(np.int32)
    cv2.fillConvexPoly(small, quarter, 255, cv2.LINE_AA, SHIFT)
    small = cv2.GaussianBlur(small, (0, 0), sigma / 4, borderType=cv2.BORDER_CONSTANT)
    mask = cv2.resize(small, (small.shape[1] * 4, small.shape[0] * 4), interpolation=cv2.INTER_LINEAR)
    roi = frame[y0:y1, x0:x1]
    keep = 255 - (mask[: y1 - y0, : x1 - x0] * 0.35).astype(np.uint8)
    roi[:] = cv2.multiply(roi, cv2.merge([keep, keep, keep]), scale=1 / 255)


def render_frames(
    xyz: np.ndarray,
    present: np.ndarray,
    scene: Scene,
    looks: Sequence[Look],
    *,
    with_masks: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the ``F`` frames of a video one by one, each uint8 ``(H, W, 3)`` BGR.

    ``xyz`` float ``(A, F, 25, 3)`` camera-space joints (m) of the ``A`` actors, ``present`` bool
    ``(A, F)``; ``looks`` one :class:`Look` per actor. A frame with nobody present is the background
    (with sensor noise). With ``with_masks`` it yields ``(frame, labels)``: ``labels`` uint8 ``(H, W)``,
    0 for background and ``1 + a`` where actor ``a`` is visible after occlusion (shadows are not in
    it). Memory stays bounded by a few frames whatever ``F`` is.
    """
    xyz = np.asarray(xyz, np.float64)
    present = np.asarray(present, bool)
    if xyz.ndim != 4 or xyz.shape[2:] != (NUM_JOINTS, 3) or present.shape != xyz.shape[:2]:
        raise ValueError(f"xyz {xyz.shape} and present {present.shape}: expected (A, F, 25, 3) and (A, F)")
    if len(looks) < xyz.shape[0]:
        raise ValueError(f"{len(looks)} looks for {xyz.shape[0]} actors")
    return _frames(xyz, present, scene, looks, with_masks)


def _frames(xyz, present, scene: Scene, looks, with_masks: bool):
    rng = np.random.default_rng(scene.noise_seed)
    height, width, scale = scene.height, scene.width, scene.scale
    # One noise field per video, a random window of it per frame: each frame's noise is Gaussian, at
    # a tenth of the cost of drawing fresh noise for every frame.
    noise = np.round(rng.normal(0.0, scene.noise_sd, (height + NOISE_PAD, width + NOISE_PAD, 3)))
    noise = noise.astype(np.int16)
    tones = [_palette(look, scene.gain) for look in looks]
    limit = 4.0 * (width + height)  # keep far off-screen points inside the fixed-point range
    for f in range(xyz.shape[1]):
        frame = scene.background.copy()
        labels = np.zeros((height, width), np.uint8) if with_masks else None
        canvas = _Canvas(frame, labels)
        groups = []
        for a in np.flatnonzero(present[:, f]).tolist():
            joints = xyz[a, f]
            if joints[:, 2].min() <= 0.05:  # behind or at the sensor: nothing sensible to draw
                continue
            px = np.clip(project_color(joints) * scale, -limit, limit)
            _shadow(frame, joints, scene.geometry, scale)
            body = _Body(px, joints, looks[a], tones[a], COLOR_F * scale)
            groups += [(depth, a, draw) for depth, draw in body.groups()]
        for _, a, draw in sorted(groups, key=lambda g: -g[0]):
            canvas.value = a + 1
            draw(canvas)
        dy, dx = rng.integers(0, NOISE_PAD + 1, 2).tolist()
        out = cv2.add(frame, noise[dy : dy + height, dx : dx + width], dtype=cv2.CV_8U)
        yield (out, labels) if with_masks else out
