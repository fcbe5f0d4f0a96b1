"""Geometry between the pose estimator and the action model: camera, lifting to camera space, tracking.

The estimator gives, per person crop, 2D joints in image pixels and 3D joints relative to the root
(spine middle) in metres. The action model wants camera-space joints (``x`` with the image's ``u``,
``y`` up, ``z`` away from the camera), as the ``.skeleton`` files hold them. :func:`solve_translation`
recovers the root's camera-space position by least squares: with the pinhole model of the colour
camera, ``u = cx + f (x + b) / z`` and ``v = cy - f y / z``, each joint gives two equations that are
linear in the translation once multiplied out.

:class:`Tracker` keeps each person in the same slot (0 or 1) across frames.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# The NTU colour camera (Kinect v2, 1920 x 1080), as in stages/synth/camera.py, which calibrates it
# on a real NTU joint line: u = cx + f * (x + baseline) / z, v = cy - f * y / z.
NTU_COLOR_SIZE = (1920, 1080)


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics of the colour camera at ``width x height`` pixels (``baseline`` in metres)."""

    f: float = 1081.0
    cx: float = 960.0
    cy: float = 568.4
    baseline: float = 0.0497
    width: int = 1920
    height: int = 1080

    def scaled(self, width: int, height: int) -> Camera:
        """The same camera for a video resized to ``width x height``; for another shape (a phone's
        4:3 or portrait video, whose lens is unknown) the long side takes the Kinect's horizontal field
        of view (83 degrees), so a portrait video is not given a 115-degree vertical one."""
        sx, sy = width / self.width, height / self.height
        f = self.f * max(width, height) / max(self.width, self.height)
        return Camera(f, self.cx * sx, self.cy * sy, self.baseline, width, height)

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """Camera-space ``(..., 3)`` m -> pixels ``(..., 2)`` (isotropic scaling assumed)."""
        z = np.maximum(xyz[..., 2], 1e-3)
        u = self.cx + self.f * (xyz[..., 0] + self.baseline) / z
        return np.stack([u, self.cy - self.f * xyz[..., 1] / z], axis=-1)


def solve_translation(rel: np.ndarray, uv: np.ndarray, weights: np.ndarray, camera: Camera) -> np.ndarray:
    """Root position ``(3,)`` (m) so that ``rel + t`` projects onto ``uv``.

    ``rel`` float ``(25, 3)`` root-relative joints (m); ``uv`` ``(25, 2)`` pixels; ``weights`` ``(25,)``
    confidence per joint (0 = ignore). Minimises the weighted algebraic error
    ``sum_j w_j [(f (x_j + t_x + b) - (u_j - cx)(z_j + t_z))^2 + (f (y_j + t_y) - (cy - v_j)(z_j + t_z))^2]``.
    Needs at least 2 joints of weight > 0; the depth is clamped to at least 0.3 m.
    """
    du, dv = uv[:, 0] - camera.cx, camera.cy - uv[:, 1]
    f = camera.f
    w = np.sqrt(np.clip(weights, 0, None))
    if (w > 0).sum() < 2:
        raise ValueError("solve_translation needs at least two joints with positive weight")
    zeros, ones = np.zeros_like(du), np.ones_like(du)
    # rows: [f, 0, -du] . t = du z - f (x + b);  [0, f, -dv] . t = dv z - f y
    a = np.concatenate([np.stack([f * ones, zeros, -du], 1), np.stack([zeros, f * ones, -dv], 1)])
    b = np.concatenate([du * rel[:, 2] - f * (rel[:, 0] + camera.baseline), dv * rel[:, 2] - f * rel[:, 1]])
    ww = np.concatenate([w, w])
    t, *_ = np.linalg.lstsq(a * ww[:, None], b * ww, rcond=None)
    if t[2] + rel[:, 2].min() < 0.3:  # behind or at the camera: keep the person in front
        t[2] = 0.3 - rel[:, 2].min()
    return t


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class Tracker:
    """Assigns each frame's person boxes to ``slots`` stable slots.

    The cost of putting a box in a slot is ``1 - IoU`` with the slot's last box plus the centre
    distance in units of that box's size; the cheapest assignment over all permutations wins (at most
    two people, so exhaustive search is exact and cheap). A box too far from every slot (cost above
    ``max_cost``) takes a free slot, or the one unseen longest; a slot unseen for ``max_age`` frames is
    freed. The first frame fills the slots left to right, so the person on the left starts in slot 0.

    ``ids`` names the track in each slot after an update (-1: never used): a box that continues its
    slot's last box keeps the id, one that starts a free slot or takes over a slot starts a new id, as
    a Kinect body ID does (so :func:`stages.denoise.actor_records` can choose actors among tracks).
    """

    def __init__(self, slots: int = 2, max_cost: float = 1.5, max_age: int = 30):
        self.slots, self.max_cost, self.max_age = slots, max_cost, max_age
        self.boxes: list[np.ndarray | None] = [None] * slots
        self.age = [0] * slots
        self.ids = [-1] * slots
        self._next_id = 0

    def _cost(self, slot: int, box: np.ndarray) -> float:
        last = self.boxes[slot]
        if last is None:
            return self.max_cost  # a free slot takes any box at the threshold cost
        size = max(last[2] - last[0], last[3] - last[1], 1e-6)
        centre = np.hypot(
            (box[0] + box[2] - last[0] - last[2]) / 2, (box[1] + box[3] - last[1] - last[3]) / 2
        )
        cost = 1.0 - box_iou(last, box) + centre / size
        # too far from a live slot: worse than a free slot, and the slot unseen longest goes first
        return cost if cost < self.max_cost else self.max_cost + 1e-3 - 1e-6 * min(self.age[slot], 999)

    def update(self, boxes: np.ndarray) -> list[int]:
        """Slots for ``boxes (K, 4)`` (K <= slots, any order); returns one slot per box."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)[: self.slots]
        if all(b is None for b in self.boxes):
            order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
            slots = [0] * len(boxes)
            for slot, k in enumerate(order):
                slots[k] = slot
        else:
            best, slots = np.inf, []
            for perm in itertools.permutations(range(self.slots), len(boxes)):
                cost = sum(self._cost(s, b) for s, b in zip(perm, boxes, strict=True))
                if cost < best:
                    best, slots = cost, list(perm)
        for s, b in sorted(zip(slots, boxes, strict=True), key=lambda p: p[0]):  # new ids in slot order
            if self.boxes[s] is None or self._cost(s, b) >= self.max_cost:  # not a continuation
                self.ids[s], self._next_id = self._next_id, self._next_id + 1
        for s in range(self.slots):
            self.age[s] += 1
        for s, b in zip(slots, boxes, strict=True):
            self.boxes[s], self.age[s] = b, 0
        for s in range(self.slots):
            if self.age[s] > self.max_age:
                self.boxes[s] = None
        return slots
