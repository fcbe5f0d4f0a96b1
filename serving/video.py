"""RGB video -> skeletons -> actions: the pose estimator feeding the action model.

Per frame, with the crop geometry the pose estimator was trained with (:mod:`stages.pose_data`):

1. the frame is letterboxed to the detector's width (:func:`stages.pose_data.letterbox`), and the
   detector's maps are decoded into at most two people (:func:`models.pose.decode_people`), whose boxes
   are mapped back to the video's pixels;
2. each person gets the square crop of training (side = ``crop_margin`` x the larger side of the box;
   the detector was trained on joint boxes, the crops are cut around joint boxes), and the keypoint
   graph gives 2D joints (mapped back to video pixels), root-relative 3D joints and confidences;
3. :func:`models.pose_geometry.solve_translation`, with the NTU colour camera scaled to the video size
   and the confidences as weights, puts each person in camera space; a person whose 2D joints lie
   within :data:`DUPLICATE_DISTANCE` torso lengths (mean over joints) of a higher-scoring person's in
   the same frame is that performer found twice (a second centre peak on one body) and is dropped;
4. a :class:`models.pose_geometry.Tracker` links each person to the same person in the frames before
   (a track, as a Kinect body ID), and the file path's body selection
   (:func:`stages.denoise.actor_records`: tracks seen in 11 frames or fewer are dropped, the one that
   moves most is actor 1, a track that does not overlap actor 1 in time continues it...) puts the
   tracks into the two slots; a track left out (a duplicate detection of an actor, a short false one)
   is dropped;
5. per actor, gaps of up to :data:`GAP_FRAMES` missed frames are interpolated and the joints are
   averaged over ``2 * SMOOTH_RADIUS + 1`` frames.

The result, :class:`VideoSkeleton`, holds joints in the pipeline's layout ``(3, T, 25, 2)`` (camera
space, metres, zeros where a slot is empty), so :func:`serving.video_actions.skeleton_to_actions`
scores it as the server scores a ``.skeleton`` upload (:func:`stages.preprocess.prepare` and the
served action model), per sliding window for long videos (a window with two actors is also scored
with actor 1 alone, see :class:`serving.video_actions.WindowInputs`). :func:`serving.video_io.annotate`
draws the result on the video; :mod:`serving.video_io` also reads videos and uploads.

    python -m serving.video --video clip.mp4 --out annotated.mp4
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import torch

from models.pose import decode_people
from models.pose_geometry import Camera, Tracker, solve_translation
from models.skeleton import MAX_PERSONS, NUM_JOINTS
from stages.bundle import BundleError
from stages.denoise import DenoiseError, actor_records
from stages.errors import RejectedInput
from stages.pose_data import crop_matrix, cut_crop, letterbox, square_crop
from stages.pose_metrics import torso_size
from stages.skeleton_text import RawSkeleton

from .model import ModelError
from .model import load as load_model
from .pose_runtime import PoseRuntime, PoseRuntimeError
from .settings import Settings
from .video_actions import STRIDE_FRAMES, WINDOW_FRAMES, skeleton_to_actions
from .video_io import (
    ACTION_FPS,
    MAX_FRAMES,
    VideoError,
    VideoInfo,
    annotate,
    check_frame_size,
    open_video,
    saved_upload,
)

_SETTINGS = Settings.model_fields  # the server's defaults are the CLI's and the functions'
MIN_FRAMES = _SETTINGS["video_min_frames"].default  # 16: about half a second at 30 fps
THRESHOLD = _SETTINGS["video_threshold"].default  # 0.3: person-centre probability
BATCH_FRAMES = 8  # frames per detector call
GAP_FRAMES = 10  # an actor missed for at most this many frames is interpolated across them
SMOOTH_RADIUS = 2  # each actor's joints: mean over 5 frames
DUPLICATE_DISTANCE = 0.5  # two people of a frame whose 2D joints lie closer than this are one (torso lengths)
VIDEO_BUNDLE = _SETTINGS["video_bundle_dir"].default  # the export_video stage's bundle
CLIP_BUNDLE = _SETTINGS["bundle_dir"].default  # the export stage's


@dataclass(frozen=True)
class VideoOptions:
    """How a video is analysed (the server's ``NTU_SERVE_VIDEO_*`` settings, the CLI's flags)."""

    threshold: float = THRESHOLD  # person-centre probability a detection needs
    flip_test: bool = False  # average each crop's heatmaps with its mirror's (twice the keypoint cost)
    min_frames: int = MIN_FRAMES
    max_frames: int = MAX_FRAMES
    window: int = WINDOW_FRAMES  # frames per action window (0: the whole video is one window)
    stride: int = STRIDE_FRAMES  # frames between window starts
    fps: float = ACTION_FPS  # frames are resampled to this rate (0: every decoded frame); see open_video

    @classmethod
    def from_settings(cls, s: Settings) -> VideoOptions:
        return cls(s.video_threshold, s.video_flip_test, s.video_min_frames, s.video_max_frames,
                   s.video_window, s.video_stride, s.video_fps)  # fmt: skip


@dataclass
class VideoSkeleton:
    """The actors of ``T`` frames in ``M = 2`` slots (actor 1 in slot 0); zeros where a slot is empty.

    An actor missed for a few frames (``max_gap``) is interpolated across them and counts as present
    there; joints and 2D joints are averaged over a few frames (``smooth_radius``)."""

    joints: np.ndarray  # float32 (3, T, 25, 2): camera space, metres (the pipeline's layout)
    joints2d: np.ndarray  # float32 (T, 2, 25, 2): video pixels (x, y), pixel centres
    confidence: np.ndarray  # float32 (T, 2, 25): keypoint confidence in [0, 1]
    boxes: np.ndarray  # float32 (T, 2, 4): detected box (x0, y0, x1, y1), video pixels
    scores: np.ndarray  # float32 (T, 2): person-centre probability
    present: np.ndarray  # bool (T, 2)
    size: tuple[int, int]  # (width, height) of the video

    @property
    def frames(self) -> int:
        return self.present.shape[0]

    @property
    def people(self) -> int:
        """Slots filled in at least one frame."""
        return int(self.present.any(0).sum())

    @property
    def frames_with_people(self) -> int:
        return int(self.present.any(1).sum())


# ---- video -> skeleton ------------------------------------------------------------------------


def _chunks(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _detector_batch(chunk: list[np.ndarray], width: int, multiple: int) -> tuple[np.ndarray, float]:
    """Letterboxed frames ``(N, H', width, 3)`` (H' padded to ``multiple``) and their scale."""
    small = [letterbox(frame, width) for frame in chunk]
    batch = np.stack([s for s, _ in small])
    pad = -batch.shape[1] % multiple
    if pad:
        batch = np.pad(batch, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return batch, small[0][1]


def _detect(runtime, chunk, threshold: float, max_people: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame of ``chunk``: boxes ``(K, 4)`` x0 y0 x1 y1 in video pixels and scores ``(K,)``."""
    batch, scale = _detector_batch(chunk, runtime.frame_width, runtime.input_multiple)
    centre, size, offset = (torch.from_numpy(np.asarray(m, np.float32)) for m in runtime.detect(batch))
    people = decode_people(centre, size, offset, max_people=max_people, threshold=threshold)
    found = []
    for boxes, scores, valid in zip(
        people.boxes.numpy(), people.scores.numpy(), people.valid.numpy(), strict=True
    ):
        b = boxes[valid].astype(np.float64) / scale  # K, 4: cx cy w h, video pixels (training: box * scale)
        half = np.maximum(b[:, 2:], 0.0) / 2
        found.append((np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1), scores[valid]))
    return found


def video_to_skeleton(
    frames: Iterable[np.ndarray],
    runtime,
    camera: Camera | None = None,
    *,
    threshold: float = THRESHOLD,
    max_people: int = MAX_PERSONS,
    flip_test: bool = False,
    batch_frames: int = BATCH_FRAMES,
    min_frames: int = MIN_FRAMES,
    max_gap: int = GAP_FRAMES,
    smooth_radius: int = SMOOTH_RADIUS,
    duplicate_distance: float = DUPLICATE_DISTANCE,
) -> VideoSkeleton:
    """Uint8 BGR frames ``(H, W, 3)`` -> :class:`VideoSkeleton`, with ``runtime`` (a
    :class:`serving.pose_runtime.PoseRuntime`) and ``camera`` (default: NTU's colour camera) scaled
    to ``W x H``. Raises :class:`VideoError` for no frame, frames of a size it cannot take
    (:func:`~serving.video_io.check_frame_size`), fewer than ``min_frames``, or nobody."""
    if not 1 <= max_people <= MAX_PERSONS:
        raise ValueError(f"max_people must be 1 to {MAX_PERSONS}, got {max_people}")
    tracker = Tracker(slots=MAX_PERSONS)
    rows: list[tuple[list[dict], list[int]]] = []  # per frame: the people found and their track ids
    size = cam = None
    for chunk in _chunks(frames, batch_frames):
        if size is None:
            size = (chunk[0].shape[1], chunk[0].shape[0])
            check_frame_size(*size)  # the decoded size: the container's may say otherwise
            cam = (camera or Camera()).scaled(*size)
        if any(f.shape != (size[1], size[0], 3) or f.dtype != np.uint8 for f in chunk):
            raise VideoError("unreadable_video", f"frames must all be uint8 {size[0]}x{size[1]} BGR images")
        found = _people(runtime, chunk, cam, threshold, max_people, flip_test)
        for people in found:
            people = _distinct(people, duplicate_distance)
            slots = tracker.update(np.array([p["box"] for p in people]).reshape(-1, 4))
            rows.append((people, [tracker.ids[slot] for slot in slots]))
    if not rows:
        raise VideoError("unreadable_video", "no frame could be decoded from the video")
    skeleton = _assemble(rows, size, max_gap, smooth_radius)
    if skeleton.frames < min_frames:
        raise VideoError(
            "too_short",
            f"the video has {skeleton.frames} frames; at least {min_frames} are needed "
            f"({min_frames / 30:.1f} s at 30 fps)",
        )
    if skeleton.frames_with_people == 0:
        raise VideoError(
            "no_person",
            f"no person was found in any of the {skeleton.frames} frames (detection threshold {threshold}); "
            "film the whole body, lit and in view",
        )
    return skeleton


def _people(
    runtime, chunk, camera: Camera, threshold: float, max_people: int, flip_test: bool
) -> list[list[dict]]:
    """Per frame of ``chunk``: the people found, each lifted by :func:`_lift` (one keypoint call)."""
    detected = _detect(runtime, chunk, threshold, max_people)
    crops, images, others = [], [], []
    for frame, (boxes, _) in zip(chunk, detected, strict=True):
        for k, box in enumerate(boxes):
            crops.append(square_crop(box, runtime.crop_margin))  # the training crop: (cx, cy, side)
            images.append(cut_crop(frame, crops[-1], runtime.crop_size))
            others.append(other_box(boxes, k, crops[-1], runtime.crop_size))
    keypoints = (
        runtime.keypoints(np.stack(images), flip_test, other=np.stack(others)) if images else ((), (), ())
    )
    out, k = [], 0
    for boxes, scores in detected:
        people = []
        for box, score in zip(boxes, scores, strict=True):
            coords, rel, conf = (np.asarray(a[k], np.float64) for a in keypoints)
            people.append(_lift(box, score, crops[k], coords, rel, conf, runtime.crop_size, camera))
            k += 1
        out.append(people)
    return out


def other_box(boxes: np.ndarray, k: int, crop: np.ndarray, crop_size: int) -> np.ndarray:
    """The box of the other person found in the frame (the largest, were there more), in the crop
    pixels of person ``k``'s ``crop (cx, cy, side)``, as training's other boxes are; NaN when ``k``
    is alone. ``boxes (K, 4)`` x0 y0 x1 y1, video pixels."""
    rest = [b for j, b in enumerate(boxes) if j != k]
    if not rest:
        return np.full(4, np.nan, np.float32)
    box = np.asarray(max(rest, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])), np.float64).reshape(2, 2)
    matrix = crop_matrix(crop, crop_size)  # video pixels -> crop pixels, as the crop is cut
    return (box @ matrix[:, :2].T + matrix[:, 2]).reshape(4).astype(np.float32)


def pose_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between the joints of two 2D poses ``(25, 2)``, in the larger one's torso lengths
    (left shoulder to right hip, as in PCK; at least 1 pixel)."""
    torso = max(float(torso_size(np.stack([a, b])).max()), 1.0)
    return float(np.linalg.norm(a - b, axis=-1).mean() / torso)


def _distinct(people: list[dict], distance: float) -> list[dict]:
    """``people`` of one frame without the duplicates: a person whose 2D joints lie within ``distance``
    (:func:`pose_distance`) of a higher-scoring person's is the same performer found twice (a second
    centre peak on one body, whose crop gives much the same skeleton) and is dropped. ``0``: keep all."""
    kept: list[dict] = []
    for person in sorted(people, key=lambda p: -p["score"]):
        if all(pose_distance(person["uv"], other["uv"]) >= distance for other in kept):
            kept.append(person)
    return [p for p in people if any(p is k for k in kept)]  # in the detector's order


def _lift(box, score, crop, coords, rel, conf, crop_size: int, camera: Camera) -> dict:
    """One person's keypoints (crop pixels, root-relative metres) -> video pixels and camera space."""
    back = cv2.invertAffineTransform(crop_matrix(crop, crop_size))  # crop pixels -> video pixels
    uv = coords @ back[:, :2].T + back[:, 2]  # 25, 2
    weights = conf if (conf > 0).sum() >= 2 else np.ones(NUM_JOINTS)  # no confident joints: all equal
    xyz = rel + solve_translation(rel, uv, weights, camera)  # 25, 3
    return {"xyz": xyz, "uv": uv, "conf": conf, "box": box, "score": score}


def _actor_slots(rows: list[tuple[list[dict], list[int]]]) -> dict[tuple[int, int], int]:
    """``(frame, person index) -> slot`` for the people :func:`stages.denoise.actor_records` keeps
    when the tracks are its bodies; the others are left out."""
    found = [(i, k, track) for i, (_, tracks) in enumerate(rows) for k, track in enumerate(tracks)]
    if not found:
        return {}
    frames = np.array([i for i, _, _ in found], np.int32)
    values = np.zeros((len(found), NUM_JOINTS, 7), np.float32)  # x y z depthX depthY colorX colorY
    for r, (i, k, _) in enumerate(found):
        values[r, :, 0:3] = rows[i][0][k]["xyz"]
        values[r, :, 5:7] = rows[i][0][k]["uv"]
    raw = RawSkeleton(
        declared_frames=len(rows),
        body_counts=np.bincount(frames, minlength=len(rows)).astype(np.int32),
        frame_index=frames,
        body_ids=np.array([track for _, _, track in found], np.uint64),
        values=values,
        tracking=np.full((len(found), NUM_JOINTS), 2, np.uint8),
    )
    try:
        actors = actor_records(raw, true_spans=True)  # a track may skip the frames it was missed in
    except DenoiseError:  # every track is short: keep the longest as the one actor
        ids, counts = np.unique(raw.body_ids, return_counts=True)
        actors = [np.flatnonzero(raw.body_ids == ids[np.argmax(counts)])]
    return {found[r][:2]: slot for slot, records in enumerate(actors) for r in records.tolist()}


def _fill_gaps(values: list[np.ndarray], present: np.ndarray, max_gap: int) -> None:
    """Interpolate ``values`` (arrays ``(T, ...)``, in place) linearly across the runs of at most
    ``max_gap`` absent frames between two present ones, which become present."""
    seen = np.flatnonzero(present)
    for a, b in itertools.pairwise(seen):
        if 1 < b - a <= max_gap + 1:
            w = ((np.arange(a + 1, b) - a) / (b - a)).astype(np.float32)
            for v in values:
                shape = (-1,) + (1,) * (v.ndim - 1)
                v[a + 1 : b] = (1 - w.reshape(shape)) * v[a] + w.reshape(shape) * v[b]
            present[a + 1 : b] = True


def _smooth(v: np.ndarray, present: np.ndarray, radius: int) -> np.ndarray:
    """The mean of ``v (T, ...)`` over the present frames within ``radius`` of each present frame."""
    t = len(v)
    weight = present.astype(np.float64).reshape((t,) + (1,) * (v.ndim - 1))
    total = np.concatenate([np.zeros((1, *v.shape[1:])), np.cumsum(v * weight, axis=0)])
    count = np.concatenate([np.zeros((1, *weight.shape[1:])), np.cumsum(weight, axis=0)])
    lo, hi = np.maximum(np.arange(t) - radius, 0), np.minimum(np.arange(t) + radius + 1, t)
    mean = (total[hi] - total[lo]) / np.maximum(count[hi] - count[lo], 1)
    return np.where(weight > 0, mean, 0).astype(v.dtype)


def _assemble(
    rows: list[tuple[list[dict], list[int]]], size: tuple[int, int], max_gap: int, radius: int
) -> VideoSkeleton:
    """The chosen actors in their slots; per slot, gaps of at most ``max_gap`` frames are bridged and
    the joints averaged over ``2 * radius + 1`` frames (the estimator's jitter is frame to frame)."""
    t = len(rows)
    joints = np.zeros((MAX_PERSONS, t, NUM_JOINTS, 3), np.float32)
    joints2d = np.zeros((MAX_PERSONS, t, NUM_JOINTS, 2), np.float32)
    confidence = np.zeros((MAX_PERSONS, t, NUM_JOINTS), np.float32)
    boxes = np.zeros((MAX_PERSONS, t, 4), np.float32)
    scores = np.zeros((MAX_PERSONS, t), np.float32)
    present = np.zeros((MAX_PERSONS, t), bool)
    for (i, k), slot in _actor_slots(rows).items():
        person = rows[i][0][k]
        joints[slot, i], joints2d[slot, i], confidence[slot, i] = person["xyz"], person["uv"], person["conf"]
        boxes[slot, i], scores[slot, i], present[slot, i] = person["box"], person["score"], True
    for m in range(MAX_PERSONS):
        _fill_gaps([joints[m], joints2d[m], confidence[m], boxes[m], scores[m]], present[m], max_gap)
        joints[m] = _smooth(joints[m], present[m], radius)
        joints2d[m] = _smooth(joints2d[m], present[m], radius)
    return VideoSkeleton(
        np.ascontiguousarray(joints.transpose(3, 1, 2, 0)),  # 3, T, 25, M: the pipeline's layout
        np.ascontiguousarray(joints2d.transpose(1, 0, 2, 3)),
        np.ascontiguousarray(confidence.transpose(1, 0, 2)),
        np.ascontiguousarray(boxes.transpose(1, 0, 2)),
        np.ascontiguousarray(scores.T),
        np.ascontiguousarray(present.T),
        size,
    )


def skeleton_from_file(
    path: Path,
    runtime,
    options: VideoOptions = VideoOptions(),
    camera: Camera | None = None,
    *,
    mirror: bool = False,
) -> tuple[VideoInfo, VideoSkeleton]:
    """Decode the video at ``path`` and run :func:`video_to_skeleton` on it; ``mirror``: on its frames
    flipped left to right (the skeletons of a mirrored performer, for training data)."""
    with open_video(path, options.max_frames, options.fps) as (info, frames):
        if mirror:
            frames = (np.ascontiguousarray(frame[:, ::-1]) for frame in frames)
        try:
            skeleton = video_to_skeleton(
                frames,
                runtime,
                camera,
                threshold=options.threshold,
                flip_test=options.flip_test,
                min_frames=options.min_frames,
            )
        except VideoError as exc:
            if exc.code != "too_short" or not info.resampled:
                raise
            # the count is after resampling: say what the file holds (20 frames at 10^6 fps are 1);
            # a container that gives no count (a browser's WebM) holds the frames decoded from it
            held = (
                f": the file's {info.declared_frames} frames at {info.fps:g} fps last "
                f"{info.declared_frames / info.fps:.2f} s"
                if info.declared_frames > 0
                else f" from the file's {info.read.decoded} decoded frames"
            )
            raise VideoError(exc.code, f"{exc.message}; counted at {info.analysed_fps:g} fps{held}") from None
    return info, skeleton


def skeleton_from_upload(
    source: BinaryIO, runtime, options: VideoOptions = VideoOptions()
) -> tuple[VideoInfo, VideoSkeleton]:
    """:func:`skeleton_from_file` on an uploaded file object (saved to a temporary file first)."""
    with saved_upload(source) as path:
        return skeleton_from_file(path, runtime, options)


# ---- command line ---------------------------------------------------------------------------------


def _describe(info: VideoInfo, skeleton: VideoSkeleton, seconds: float) -> str:
    damaged = info.read.unreadable
    return (
        f"{skeleton.frames} frames {info.width}x{info.height} at {info.fps:.1f} fps"
        f"{f' (analysed at {info.analysed_fps:g} fps)' if info.resampled else ''}"
        f"{f'; {damaged} damaged frame(s), each shown as the one before' if damaged else ''}"
        f"; {skeleton.people} "
        f"person(s), in {skeleton.frames_with_people} frames; pose {seconds:.1f} s "
        f"({skeleton.frames / max(seconds, 1e-9):.1f} frames/s)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m serving.video",
        description="Find the people of a video, track their skeletons and name their actions.",
    )
    ap.add_argument("--video", required=True, type=Path, help="an .avi / .mp4 (anything OpenCV decodes)")
    ap.add_argument("--out", type=Path, help="write the annotated video here (.mp4 or .avi)")
    ap.add_argument("--pose-dir", type=Path, default=Path("data/export_pose"), help="export_pose's output")
    ap.add_argument(
        "--bundle-dir",
        type=Path,
        help=f"the action bundle (default: {VIDEO_BUNDLE}, the model fine-tuned on estimated skeletons, "
        f"when it exists, else {CLIP_BUNDLE})",
    )
    ap.add_argument("--top", type=int, default=3, help="actions listed per window")
    ap.add_argument("--window-frames", type=int, default=WINDOW_FRAMES, help="0: one window")
    ap.add_argument("--stride", type=int, default=STRIDE_FRAMES, help="frames between windows")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="person-centre probability")
    ap.add_argument("--flip-test", action="store_true", help="average each crop with its mirror")
    ap.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="longest video, in analysed frames")
    ap.add_argument("--fps", type=float, default=ACTION_FPS, help="analysis frame rate (0: every frame)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: cores)")
    args = ap.parse_args(argv)
    if args.top < 1 or args.stride < 1 or args.window_frames < 0 or args.max_frames < 1 or args.fps < 0:
        ap.error("--top, --stride and --max-frames must be at least 1, --window-frames and --fps at least 0")
    options = VideoOptions(
        threshold=args.threshold,
        flip_test=args.flip_test,
        max_frames=args.max_frames,
        window=args.window_frames,
        stride=args.stride,
        fps=args.fps,
    )
    model = None
    try:
        runtime = PoseRuntime.load(args.pose_dir, args.threads)
        bundle_dir = args.bundle_dir or (VIDEO_BUNDLE if VIDEO_BUNDLE.exists() else CLIP_BUNDLE)
        model = load_model(Settings(bundle_dir=bundle_dir, model_uri=None, threads=args.threads))
        print(f"action model: {model.meta['name']} {model.meta['version']} ({bundle_dir})")
        started = time.perf_counter()
        info, skeleton = skeleton_from_file(args.video, runtime, options)
        print(f"video: {_describe(info, skeleton, time.perf_counter() - started)}")
        windows = skeleton_to_actions(
            skeleton.joints, model, window=options.window, stride=options.stride, top=args.top
        )
        for w in windows:
            tops = ", ".join(f"{c.name} {c.probability:.3f}" for c in w.prediction.top)
            print(f"frames {w.start}-{w.end - 1}: {tops}")
        if args.out is not None:
            with open_video(args.video, options.max_frames, options.fps) as (_, frames):
                written = annotate(frames, skeleton, windows, args.out, info.analysed_fps or info.fps)
            print(f"annotated video: {args.out} ({written} frames)")
    except RejectedInput as exc:
        print(f"video: error: {exc.message}", file=sys.stderr)
        return 2
    except (PoseRuntimeError, ModelError, BundleError, ValueError, OSError) as exc:
        print(f"video: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if model is not None:
            model.cleanup.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
