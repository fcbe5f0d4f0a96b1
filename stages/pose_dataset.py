"""The pose store (``pose.zarr`` from :mod:`stages.pose_data`) as training batches, with augmentation.

Person crops carry 2D joints in crop pixels, root-relative 3D joints (m) and Kinect tracking states;
detector frames carry up to two person boxes. A split is the ``train`` or ``test`` half of a
benchmark (``ntu120_xsub``: held-out performers), chosen through ``videos.parquet``.

Augmentation (training only) keeps 2D and 3D labels consistent: one affine per crop (scale,
in-plane rotation, optional horizontal flip) moves the 2D joints; the 3D joints turn by the same
rotation about the camera axis, and a flip negates ``x``; both swap left and right joints
(:data:`models.skeleton.FLIP_INDEX`). Colour jitter and blur change pixels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
import zarr
from torch.utils.data import Dataset

from models.skeleton import FLIP_INDEX
from stages.pose_data import STORE_LAYOUT
from stages.store import ContractError

FLIP = np.asarray(FLIP_INDEX)


@dataclass(frozen=True)
class AugmentParams:
    """``train_pose.augment`` in params.yaml."""

    scale: float = 0.2  # crop scale factor drawn from [1 - scale, 1 + scale]
    rotation: float = 20.0  # in-plane rotation, degrees, drawn from [-rotation, rotation]
    flip: float = 0.5  # probability of a horizontal flip (with left/right joint swap)
    brightness: float = 0.3  # multiplicative, per channel gain drawn from [1 - b, 1 + b]
    contrast: float = 0.3
    blur: float = 0.2  # probability of a Gaussian blur (sigma 0.5-1.5 px)
    shift: float = 0.08  # crop centre shift, fraction of the side (detector boxes are not exact)
    other_jitter: float = 0.05  # std of the other person's box sides, fraction of its width / height
    other_drop: float = 0.1  # probability of hiding the other person's box (a detector miss)


@dataclass
class PoseSplit:
    """One split held in memory: crops and their labels, detector frames and their boxes."""

    crops: np.ndarray  # uint8 (N, S, S, 3) BGR
    joints2d: np.ndarray  # float32 (N, 25, 2) crop pixels
    joints3d: np.ndarray  # float32 (N, 25, 3) m, root-relative
    visible: np.ndarray  # float32 (N, 25) 1 tracked, 0.5 inferred, 0 not tracked or outside the frame
    crop_box: np.ndarray  # float32 (N, 3) cx, cy, side in video pixels
    crop_video: np.ndarray  # int32 (N,) row of videos.parquet
    frames: np.ndarray  # uint8 (F, Hf, Wf, 3)
    frame_boxes: np.ndarray  # float32 (F, 2, 4) x0 y0 x1 y1 in frame pixels; zeros = no person
    video_scale: np.ndarray  # float32 (N,) video pixels per 1920x1080 colour-frame pixel, per crop
    other_box: np.ndarray  # float32 (N, 4) the other person's joint box, crop px; NaN: alone


def open_pose_store(pose_dir: Path) -> tuple[zarr.Group, list[dict]]:
    """The store and its video table; raises :class:`ContractError` when it is not a pose store."""
    path = Path(pose_dir) / "pose.zarr"
    if not path.exists():
        raise ContractError(f"{path}: pose store not found (run the pose_data stage first)")
    group = zarr.open_group(str(path), mode="r")
    if group.attrs.get("layout") != STORE_LAYOUT:
        raise ContractError(f"{path}: layout {group.attrs.get('layout')!r}, expected {STORE_LAYOUT!r}")
    return group, pq.read_table(Path(pose_dir) / "videos.parquet").to_pylist()


def load_split(pose_dir: Path, benchmark: str, split: str, max_crops: int = 0, seed: int = 0) -> PoseSplit:
    """The crops and frames of the videos in ``split`` of ``benchmark``.

    ``max_crops`` > 0 keeps a seeded random subset of the crops.
    """
    group, videos = open_pose_store(pose_dir)
    members = np.array([v["index"] for v in videos if v["status"] == "ok" and v.get(benchmark) == split])
    crop_video = group["crop_video"][:]
    rows = np.flatnonzero(np.isin(crop_video, members))
    # the labels of every crop of the split, read once: a crop's peer (the other person of its frame)
    # may be left out of the subset below, and its box is still that crop's other box
    crop_box, joints2d, tracking = (take_rows(group[k], rows) for k in ("crop_box", "joints2d", "tracking"))
    other = other_boxes(
        crop_video[rows],
        group["crop_frame"][:][rows],
        crop_box,
        joints2d,
        tracking > 0,
        group["crops"].shape[1],
    )
    keep = np.arange(len(rows))
    if max_crops and len(rows) > max_crops:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_crops, replace=False))
    rows, crop_box, joints2d, tracking, other = (a[keep] for a in (rows, crop_box, joints2d, tracking, other))
    frame_rows = (
        np.flatnonzero(np.isin(group["frame_video"][:], members)) if "frame_video" in group else rows[:0]
    )
    widths = np.array([v.get("width") or 1920 for v in videos], np.float32)
    return PoseSplit(
        crops=take_rows(group["crops"], rows),
        joints2d=joints2d,
        joints3d=take_rows(group["joints3d"], rows),
        visible=np.select([tracking == 2, tracking == 1], [1.0, 0.5], 0.0).astype(np.float32),
        crop_box=crop_box,
        crop_video=crop_video[rows],
        frames=take_rows(group["frames"], frame_rows)
        if "frames" in group
        else np.zeros((0, 32, 32, 3), np.uint8),
        frame_boxes=take_rows(group["frame_boxes"], frame_rows)
        if "frames" in group
        else np.zeros((0, 2, 4), np.float32),
        video_scale=widths[crop_video[rows]] / 1920.0,
        other_box=other,
    )


def other_boxes(
    crop_video: np.ndarray,
    crop_frame: np.ndarray,
    crop_box: np.ndarray,
    joints2d: np.ndarray,
    valid: np.ndarray,
    size: int,
) -> np.ndarray:
    """For each crop, the joint box ``(x0, y0, x1, y1)`` of the other person labelled in the same
    video frame, in this crop's pixels (the box the detector is trained to find, as it lands in the
    crop); NaN where the person is alone. ``crop_box (N, 3)`` cx, cy, side in video pixels,
    ``joints2d (N, 25, 2)`` crop pixels, ``valid (N, 25)`` the labelled joints, ``size`` the crop side."""
    out = np.full((len(crop_video), 4), np.nan, np.float32)
    key = crop_video.astype(np.int64) * (1 << 32) + crop_frame.astype(np.int64)
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    for a, b in zip(starts, ends, strict=True):
        if b - a < 2:
            continue
        group = order[a:b]
        video_boxes = {}
        for r in group:
            pts = joints2d[r][valid[r]]
            if len(pts):
                cx, cy, side = (float(v) for v in crop_box[r])
                box = np.concatenate([pts.min(0), pts.max(0)]) * (side / size)  # video px from the corner
                video_boxes[r] = box + [cx - side / 2, cy - side / 2] * 2
        for r in group:
            others = [video_boxes[q] for q in group if q != r and q in video_boxes]
            if others:  # NTU labels at most two people; with more, the largest other one
                box = max(others, key=lambda x: (x[2] - x[0]) * (x[3] - x[1]))
                cx, cy, side = (float(v) for v in crop_box[r])
                out[r] = (box - [cx - side / 2, cy - side / 2] * 2) * (size / side)
    return out


def take_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows``, read one shard at a time (bounded memory, each shard once)."""
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    step = (array.shards or array.chunks)[0]
    done = 0
    for start in range(0, array.shape[0], step):
        inside = rows[(rows >= start) & (rows < start + step)]
        if len(inside):
            block = array[start : min(start + step, array.shape[0])]
            out[done : done + len(inside)] = block[inside - start]
            done += len(inside)
    return out


def crop_affine(
    size: int, scale: float, degrees: float, flip: bool, shift: tuple[float, float]
) -> np.ndarray:
    """2x3 affine on crop pixels: zoom ``scale`` and rotate ``degrees`` (counter-clockwise on screen)
    about the centre moved by ``shift`` (pixels), then mirror when ``flip``."""
    c = (size - 1) / 2.0
    a = math.radians(degrees)
    rot = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    centre = np.array([c + shift[0], c + shift[1]])
    matrix = np.concatenate([rot, (np.array([c, c]) - rot @ centre)[:, None]], axis=1)
    if flip:
        matrix = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0, 0, 1]])
    return matrix


def rotate_3d(xyz: np.ndarray, degrees: float, flip: bool) -> np.ndarray:
    """The 3D counterpart of :func:`crop_affine` for camera-space ``xyz (..., 3)`` (x with u, y up)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # Image (u, v) with v down is (x, -y): a screen rotation by +a is (x, y) -> (c x - s y, s x + c y).
    x = c * xyz[..., 0] - s * xyz[..., 1]
    y = s * xyz[..., 0] + c * xyz[..., 1]
    out = np.stack([x, y, xyz[..., 2]], axis=-1)
    if flip:
        out[..., 0] = -out[..., 0]
    return out


def augment_crop(
    image: np.ndarray,
    uv: np.ndarray,
    xyz: np.ndarray,
    visible: np.ndarray,
    rng: np.random.Generator,
    aug: AugmentParams,
    other: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One random augmentation of a crop ``(S, S, 3)`` and its labels (2D crop px, 3D m, visibility)
    and of the other person's box ``(4,)`` (crop px, NaN: none; returned as the axis-aligned box
    around its moved corners, each side jittered by ``other_jitter`` of its length, and dropped to
    NaN with probability ``other_drop``, as when the detector misses that person)."""
    size = image.shape[0]
    scale = float(rng.uniform(1 - aug.scale, 1 + aug.scale))
    degrees = float(rng.uniform(-aug.rotation, aug.rotation))
    flip = bool(rng.random() < aug.flip)
    shift = tuple(rng.uniform(-aug.shift, aug.shift, 2) * size)
    matrix = crop_affine(size, scale, degrees, flip, shift)
    image = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    uv = uv @ matrix[:, :2].T + matrix[:, 2]
    xyz = rotate_3d(xyz, degrees, flip)
    if flip:
        uv, xyz, visible = uv[FLIP], xyz[FLIP], visible[FLIP]
    inside = (uv >= 0).all(1) & (uv <= size - 1).all(1)
    other = move_box(other, matrix, rng, aug)
    return colour_jitter(image, rng, aug), uv, xyz, np.where(inside, visible, 0.0), other


def move_box(
    box: np.ndarray | None, matrix: np.ndarray, rng: np.random.Generator, aug: AugmentParams
) -> np.ndarray:
    """A box ``(4,)`` x0 y0 x1 y1 through the 2x3 affine ``matrix``, jittered and maybe dropped
    (:func:`augment_crop`); NaN (or ``None``) stays NaN. Draws from ``rng`` either way, so a crop's
    other augmentations do not depend on whether it has a peer."""
    jitter = rng.normal(0.0, aug.other_jitter, 4)
    drop = rng.random() < aug.other_drop
    if box is None or not np.isfinite(box).all() or drop:
        return np.full(4, np.nan, np.float32)
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) @ matrix[:, :2].T + matrix[:, 2]
    lo, hi = corners.min(0), corners.max(0)
    extent = np.tile(hi - lo, 2)
    return (np.concatenate([lo, hi]) + jitter * extent).astype(np.float32)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, aug: AugmentParams) -> np.ndarray:
    """Per-channel gain, contrast about the mean, and an occasional Gaussian blur (uint8 in and out)."""
    x = image.astype(np.float32)
    gain = rng.uniform(1 - aug.brightness, 1 + aug.brightness, 3).astype(np.float32)
    contrast = np.float32(rng.uniform(1 - aug.contrast, 1 + aug.contrast))
    mean = x.mean()
    x = (x - mean) * contrast + mean
    x *= gain
    if rng.random() < aug.blur:
        x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.5, 1.5)))
    return np.clip(x, 0, 255).astype(np.uint8)


def flip_frame(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a detector frame and its boxes ``(2, 4)`` (all-zero rows stay zero)."""
    w = image.shape[1]
    present = boxes.any(axis=1)
    out = boxes.copy()
    out[present, 0], out[present, 2] = w - 1 - boxes[present, 2], w - 1 - boxes[present, 0]
    return image[:, ::-1].copy(), out


class CropDataset(Dataset):
    """``(image uint8 (S, S, 3) BGR, joints2d (25, 2), joints3d (25, 3), visible (25,), other (4,))``
    tensors (images as OpenCV holds them; :func:`models.pose.normalise_images` makes the network's
    input; ``other`` the other person's box in crop pixels, NaN when alone)."""

    def __init__(self, split: PoseSplit, aug: AugmentParams | None, seed: int = 0):
        self.split, self.aug, self.seed, self.epoch = split, aug, seed, 0

    def __len__(self) -> int:
        return len(self.split.crops)

    def __getitem__(self, i: int):
        s = self.split
        image, uv, xyz, vis = s.crops[i], s.joints2d[i], s.joints3d[i], s.visible[i]
        other = s.other_box[i]
        if self.aug is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            image, uv, xyz, vis, other = augment_crop(image, uv, xyz, vis, rng, self.aug, other)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.asarray(uv, np.float32)),
            torch.from_numpy(np.asarray(xyz, np.float32)),
            torch.from_numpy(np.asarray(vis, np.float32)),
            torch.from_numpy(np.asarray(other, np.float32)),
        )


class FrameDataset(Dataset):
    """``(image uint8 (Hf, Wf, 3) BGR, boxes (2, 4) x0 y0 x1 y1)`` tensors; training flips and jitters."""

    def __init__(self, split: PoseSplit, aug: AugmentParams | None, seed: int = 0):
        self.split, self.aug, self.seed, self.epoch = split, aug, seed, 0

    def __len__(self) -> int:
        return len(self.split.frames)

    def __getitem__(self, i: int):
        image, boxes = self.split.frames[i], self.split.frame_boxes[i]
        if self.aug is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i, 1))
            if rng.random() < self.aug.flip:
                image, boxes = flip_frame(image, boxes)
            image = colour_jitter(image, rng, self.aug)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.asarray(boxes, np.float32)),
        )
