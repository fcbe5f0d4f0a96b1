"""A port of CTR-GCN's reference preparation (get_raw_skes_data.py + get_raw_denoised_data.py),
kept close to the original's data structures, to check stages.denoise against it.

``actor2_virtual_start=True`` is the original (actor 2's interval starts at a virtual [0, 0]);
``False`` is the documented deviation of stages.denoise (it starts empty). Returns float32
``(T, 150)`` (two actors of 25 x 3), or ``None`` where the original would crash (no body survives).
"""

from __future__ import annotations

import numpy as np


def read_bodies(text: str) -> tuple[dict, int]:
    lines = text.splitlines()
    num_frames, cursor, valid, bodies = int(lines[0]), 1, -1, {}
    for _ in range(num_frames):
        count = int(lines[cursor])
        cursor += 1
        if count == 0:
            continue
        valid += 1
        joints = np.zeros((count, 25, 3), dtype=np.float32)
        for b in range(count):
            body_id = lines[cursor].split()[0]
            cursor += 2  # body line, joint count
            for j in range(25):
                joints[b, j] = np.array(lines[cursor].split()[:3], dtype=np.float32)
                cursor += 1
            if body_id not in bodies:
                bodies[body_id] = {"joints": joints[b], "interval": [valid]}
            else:
                data = bodies[body_id]
                data["joints"] = np.vstack((data["joints"], joints[b]))
                data["interval"].append(data["interval"][-1] + 1)
    if len(bodies) > 1:
        for data in bodies.values():
            data["motion"] = np.sum(np.var(data["joints"], axis=0))
    return bodies, valid + 1


def _denoise(bodies: dict) -> list:
    for key in list(bodies):
        if len(bodies[key]["interval"]) <= 11:
            del bodies[key]
    if len(bodies) == 1:
        return list(bodies.items())
    for key, data in list(bodies.items()):
        if len(bodies) == 1:
            break
        points = data["joints"].reshape(-1, 25, 3)
        valid = [
            i for i in range(len(points))
            if np.ptp(points[i, :, 0]) <= 0.8 * np.ptp(points[i, :, 1])
        ]  # fmt: skip
        noise = len(data["interval"]) - len(valid)
        if noise == 0:
            continue
        if noise / float(len(data["interval"])) >= 0.69754:
            del bodies[key]
        else:
            data["motion"] = min(data["motion"], np.sum(np.var(points[valid].reshape(-1, 3), axis=0)))
    return sorted(bodies.items(), key=lambda kv: kv[1]["motion"], reverse=True)


def prepare(text: str, actor2_virtual_start: bool) -> np.ndarray | None:
    bodies, num_frames = read_bodies(text)
    out = np.zeros((num_frames, 150), dtype=np.float32)
    if len(bodies) == 1:
        data = next(iter(bodies.values()))
        out[data["interval"][0] : data["interval"][-1] + 1, :75] = data["joints"].reshape(-1, 75)
        return out
    ranked = _denoise(bodies)
    if not ranked:
        return None
    first = ranked[0][1]
    start1, end1 = first["interval"][0], first["interval"][-1]
    out[start1 : end1 + 1, :75] = first["joints"].reshape(-1, 75)
    start2, end2 = (0, 0) if actor2_virtual_start else (None, None)
    for _, data in ranked[1:]:
        start, end = data["interval"][0], data["interval"][-1]
        if min(end1, end) - max(start1, start) <= 0:
            out[start : end + 1, :75] = data["joints"].reshape(-1, 75)
            start1, end1 = min(start, start1), max(end, end1)
        elif start2 is None or min(end2, end) - max(start2, start) <= 0:
            out[start : end + 1, 75:] = data["joints"].reshape(-1, 75)
            start2 = start if start2 is None else min(start, start2)
            end2 = end if end2 is None else max(end, end2)
    return out[out.sum(axis=1) != 0]
