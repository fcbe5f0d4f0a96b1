"""Video -> skeleton -> actions: the geometry chain, the exported pose graphs on a drawn video, the
action windows, the annotated video, POST /v1/predict/video and ``python -m serving.video``."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.pose_geometry import Camera
from models.skeleton import MAX_PERSONS, NUM_JOINTS, SPINE_MIDDLE
from serving import model as model_loader
from serving import video, video_actions, video_io
from serving.app import create_app
from serving.pose_runtime import PoseRuntime
from serving.schemas import ClassScore, Prediction
from stages import video_frames
from stages.ntu_files import MUTUAL_ACTIONS
from stages.pose_data import crop_matrix, square_crop
from tests.factory import STANDING, moving
from tests.pose_helpers import (
    browser_recording,
    damage_frames,
    pose_export,
    rotated_mp4,
    stick_figure_frames,
    write_video,
)
from tests.serving_helpers import Reference, as_clip, raw_files, serving, settings_for, softmax

ROOT = Path(__file__).resolve().parents[1]
HEAD = 3
HEAD_HEIGHT = 0.45  # m above the root in the fake keypoint head's 3D answer
UP = np.array([0.0, HEAD_HEIGHT, 0.0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return pose_export(tmp_path_factory)


@pytest.fixture(scope="module")
def runtime(exported):
    return PoseRuntime.load(exported.dir)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "walk.avi", stick_figure_frames(40))


@pytest.fixture(scope="module")
def action_model(tiny_bundle):
    loaded = model_loader.load(settings_for(tiny_bundle.bundle_dir))
    yield loaded
    loaded.cleanup.close()


# ---- the geometry chain, with a fake pose model whose answers are known ---------------------------------


def _centroid(channel: np.ndarray) -> np.ndarray:
    w = channel.astype(np.float64)
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


class BlobRuntime:
    """A stand-in for :class:`PoseRuntime`: a person is a green torso (its centroid is the root) with
    a red head patch above it (its centroid is the head, HEAD_HEIGHT m above the root).

    ``detect`` finds each person's blobs in the letterboxed frame and encodes their bounding box as
    CenterNet maps, with scores whose order flips every frame; ``keypoints`` measures the centroids in
    each crop it is given. Both record what they were given.
    """

    crop_size, frame_width, crop_margin, input_multiple = 64, 320, 1.3, 32

    def __init__(self):
        self.frame_shapes, self.crop_shapes, self.frames_seen, self.others = [], [], 0, []

    def detect(self, frames: np.ndarray):
        n, h, w, _ = frames.shape
        self.frame_shapes.append(frames.shape)
        centre = np.zeros((n, 1, h // 8, w // 8), np.float32)
        size, offset = (
            np.zeros((n, 2, h // 8, w // 8), np.float32),
            np.zeros((n, 2, h // 8, w // 8), np.float32),
        )
        for i, frame in enumerate(frames):
            mask = (frame.max(-1) > 40).astype(np.uint8)
            count, labels = cv2.connectedComponents(cv2.dilate(mask, np.ones((31, 31), np.uint8)))
            for k in range(1, count):
                ys, xs = np.nonzero(mask * (labels == k))
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)
                c = (box[:2] + box[2:]) / 2
                cell = np.floor((c + 0.5) / 8).astype(int)
                score = 0.9 if (k + self.frames_seen) % 2 else 0.6  # the order flips every frame
                centre[i, 0, cell[1], cell[0]] = score
                size[i, :, cell[1], cell[0]] = (box[2:] - box[:2]) / 8
                offset[i, :, cell[1], cell[0]] = (c + 0.5) / 8 - cell
            self.frames_seen += 1
        return centre, size, offset

    def keypoints(self, crops: np.ndarray, flip_test: bool = False, other: np.ndarray | None = None):
        self.crop_shapes.append(crops.shape)
        self.others.append(other)
        n = len(crops)
        coords, rel, conf = (
            np.zeros((n, NUM_JOINTS, 2)),
            np.zeros((n, NUM_JOINTS, 3)),
            np.zeros((n, NUM_JOINTS)),
        )
        for i, crop in enumerate(crops):
            coords[i, :] = _centroid(crop[..., 1])  # green: the torso
            coords[i, HEAD] = _centroid(crop[..., 2])  # red: the head
            rel[i, HEAD, 1] = HEAD_HEIGHT
            conf[i, [SPINE_MIDDLE, HEAD]] = 1.0
        return coords, rel, conf


def _draw_person(image, camera: Camera, root: np.ndarray) -> dict:
    """Draw a blob person whose root is at camera-space ``root``; return what the pipeline must find."""
    u, v = np.rint(camera.project(root)).astype(int)
    vh = int(np.rint(camera.project(root + UP)[1]))
    image[v - 25 : v + 26, u - 12 : u + 13] = (0, 200, 0)  # odd sizes: the centroid is (u, v) exactly
    image[vh - 4 : vh + 5, u - 4 : u + 5] = (0, 0, 255)
    z = camera.f * HEAD_HEIGHT / (v - vh)  # the depth the drawn pixels imply, by similar triangles
    xyz = np.array([(u - camera.cx) * z / camera.f - camera.baseline, (camera.cy - v) * z / camera.f, z])
    return {"root2d": (u, v), "head2d": (u, vh), "box": (u - 12, vh - 4, u + 12, v + 25), "root": xyz}


def test_geometry_chain_back_to_video_pixels_camera_space_and_actor_slots():
    width, height, frames = 640, 360, 14  # letterboxed to 320 x 192: scale 0.5
    camera = Camera().scaled(width, height)
    images, truth = [], []
    for t in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        people = {}
        if t != 5:  # the left person is hidden in frame 5
            people[0] = _draw_person(image, camera, np.array([-0.9 + 0.01 * t, 0.05, 3.0]))
        people[1] = _draw_person(image, camera, np.array([0.8 - 0.03 * t, -0.1, 4.0]))  # moves most
        images.append(image)
        truth.append(people)
    fake = BlobRuntime()
    skeleton = video.video_to_skeleton(iter(images), fake, min_frames=1, max_gap=0, smooth_radius=0)

    assert [s[1:] for s in fake.frame_shapes] == [(192, 320, 3)] * 2  # letterboxed, 8 + 6 frames
    assert all(s[1:] == (64, 64, 3) for s in fake.crop_shapes)
    others = np.concatenate(fake.others)  # each crop is told where the other person is: 13 frames x 2
    alone = ~np.isfinite(others).all(1)
    assert len(others) == 27 and alone.sum() == 1 and np.isnan(others[alone]).all()  # frame 5's crop
    assert skeleton.frames == frames and skeleton.size == (width, height) and skeleton.people == 2
    slot_of = {1: 0, 0: 1}  # the person who moves most is actor 1 (slot 0), as in the file path
    assert skeleton.present[:, 0].all() and skeleton.present[:, 1].sum() == frames - 1
    for t, people in enumerate(truth):
        for person, want in people.items():  # each person stays in one slot though the order flips
            slot = slot_of[person]
            np.testing.assert_allclose(skeleton.joints2d[t, slot, SPINE_MIDDLE], want["root2d"], atol=0.3)
            np.testing.assert_allclose(skeleton.joints2d[t, slot, HEAD], want["head2d"], atol=0.3)
            np.testing.assert_allclose(skeleton.boxes[t, slot], want["box"], atol=1.5)  # via 1/2 scale
            root = skeleton.joints[:, t, SPINE_MIDDLE, slot]
            np.testing.assert_allclose(root, want["root"], atol=0.02)  # 3 or 4 m deep, within 2 cm
            np.testing.assert_allclose(skeleton.joints[:, t, HEAD, slot], root + UP, atol=1e-5)
    assert not skeleton.joints[:, 5, :, 1].any() and not skeleton.joints2d[5, 1].any()  # empty: zeros
    assert skeleton.scores[0, 1] in (np.float32(0.9), np.float32(0.6)) and skeleton.scores[5, 1] == 0
    bridged = video.video_to_skeleton(iter(images), BlobRuntime(), min_frames=1, smooth_radius=0)
    assert bridged.present.all()  # the 1-frame gap is interpolated from frames 4 and 6
    np.testing.assert_allclose(
        bridged.joints[:, 5, :, 1], (skeleton.joints[:, 4, :, 1] + skeleton.joints[:, 6, :, 1]) / 2, atol=1e-6
    )
    np.testing.assert_allclose(bridged.joints[:, :5], skeleton.joints[:, :5])  # the rest as it was


def test_other_box_is_the_other_detection_in_the_crops_pixels():
    boxes = np.array([[100, 50, 160, 250], [140, 60, 220, 240], [300, 40, 310, 60]], np.float64)
    crop = square_crop(boxes[0], 1.3)  # (130, 150, 260)
    got = video.other_box(boxes[:2], 0, crop, 128)
    matrix = crop_matrix(crop, 128)
    want = np.concatenate(
        [boxes[1, :2] @ matrix[:, :2].T + matrix[:, 2], boxes[1, 2:] @ matrix[:, :2].T + matrix[:, 2]]
    )
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got.dtype == np.float32 and np.isnan(video.other_box(boxes[:1], 0, crop, 128)).all()  # alone
    np.testing.assert_allclose(video.other_box(boxes, 0, crop, 128), want, atol=1e-4)  # the largest other
    back = video.other_box(boxes[:2], 1, square_crop(boxes[1], 1.3), 128)
    assert 0 < back[0] < back[2] < 64  # person 0 stands left of person 1, inside its crop


def test_a_track_missed_for_a_while_keeps_its_slot_to_itself():
    """The tracker keeps a person's id across missed frames; the actor choice must see the track's
    true span, or a stray box late in the video "continues" actor 1 and shares its frames."""
    lively = moving(STANDING, 100, 0.3, 0)
    second = moving(STANDING + np.array([1.0, 0, 0]), 100, 0.1, 1)
    stray = moving(STANDING + np.array([-1.0, 0, 0]), 100, 0.02, 2)
    rows = []
    for t in range(100):
        seen = [(7, lively[t])] if t < 30 or t >= 50 else []
        seen += [(8, second[t])] + ([(9, stray[t])] if t >= 85 else [])
        people = [{"xyz": xyz, "uv": xyz[:, :2] * 100} for _, xyz in seen]
        rows.append((people, [track for track, _ in seen]))
    slots = video._actor_slots(rows)
    track_of = {(i, k): rows[i][1][k] for i in range(100) for k in range(len(rows[i][1]))}
    assert {track_of[key]: slot for key, slot in slots.items()} == {7: 0, 8: 1}  # the stray box: none
    assert sum(track_of[key] == 7 for key in slots) == 80 and len(slots) == 180


def test_gaps_are_bridged_and_joints_averaged_over_present_frames_only():
    present = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 1], bool)
    v = np.arange(10, dtype=np.float32)[:, None] * present[:, None] * np.array([[1.0, -2.0]], np.float32)
    filled, now = v.copy(), present.copy()
    video._fill_gaps([filled], now, max_gap=2)  # the 2-frame gap is bridged, the 3-frame one is not
    assert now.tolist() == [True] * 5 + [False] * 3 + [True] * 2
    np.testing.assert_allclose(filled[:5, 0], [0, 1, 2, 3, 4])  # linear between frames 1 and 4
    np.testing.assert_array_equal(filled[5:], v[5:])
    smooth = video._smooth(filled, now, radius=1)
    np.testing.assert_allclose(smooth[:, 0], [0.5, 1, 2, 3, 3.5, 0, 0, 0, 8.5, 8.5])  # absent: not used
    np.testing.assert_allclose(smooth[:, 1], -2 * smooth[:, 0])
    assert smooth.dtype == np.float32 and video._smooth(filled, now, radius=0).tolist() == filled.tolist()


def test_a_short_false_track_is_dropped_and_the_person_is_actor_1():
    """The failure the file path's body selection fixes: a false box in the first frames took slot 0
    (the first frame fills slots left to right) and left the real person in slot 1 all video long."""
    width, height, frames = 640, 360, 16
    camera = Camera().scaled(width, height)
    images = []
    for t in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        if t < 3:  # a person-like blob on the left in frames 0-2 only
            _draw_person(image, camera, np.array([-0.9, 0.05, 3.0]))
        _draw_person(image, camera, np.array([0.8 - 0.02 * t, -0.1, 4.0]))
        images.append(image)
    skeleton = video.video_to_skeleton(iter(images), BlobRuntime(), min_frames=1)
    assert skeleton.present[:, 0].all() and not skeleton.present[:, 1].any() and skeleton.people == 1
    assert (skeleton.joints2d[:, 0, SPINE_MIDDLE, 0] > width / 2).all()  # the person on the right


class TwiceRuntime(BlobRuntime):
    """:class:`BlobRuntime` that also finds each person a second time: a weaker centre peak two cells
    to the right with the same box size, whose crop still holds the whole person (a duplicate)."""

    def detect(self, frames: np.ndarray):
        centre, size, offset = super().detect(frames)
        n, _, ys, xs = np.nonzero(centre)
        centre[n, 0, ys, xs + 2] = centre[n, 0, ys, xs] - 0.25
        size[n, :, ys, xs + 2], offset[n, :, ys, xs + 2] = size[n, :, ys, xs], offset[n, :, ys, xs]
        return centre, size, offset


def test_a_person_found_twice_in_a_frame_is_one_actor():
    width, height, frames = 640, 360, 16
    camera = Camera().scaled(width, height)
    images = []
    for t in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        _draw_person(image, camera, np.array([-0.3 + 0.02 * t, -0.1, 4.0]))
        images.append(image)
    kept = video.video_to_skeleton(iter(images), TwiceRuntime(), min_frames=1, duplicate_distance=0)
    assert kept.people == 2  # without the check the second box becomes actor 2, on actor 1's body
    np.testing.assert_allclose(kept.joints2d[:, 1], kept.joints2d[:, 0], atol=0.5)
    one = video.video_to_skeleton(iter(images), TwiceRuntime(), min_frames=1)
    assert one.people == 1 and one.present[:, 0].all() and not one.present[:, 1].any()
    np.testing.assert_allclose(one.joints2d[:, 0], kept.joints2d[:, 0])
    np.testing.assert_array_equal(one.scores[:, 0], kept.scores.max(1))  # the stronger one is kept


def test_a_mirrored_read_finds_the_person_where_the_mirror_puts_it(tmp_path):
    width, height, frames = 640, 360, 12
    camera = Camera().scaled(width, height)
    images = []
    for t in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        _draw_person(image, camera, np.array([-0.9 + 0.02 * t, 0.05, 3.0]))  # left of centre
        images.append(image)
    path = write_video(tmp_path / "left.avi", images)
    options = video.VideoOptions(min_frames=1)
    _, straight = video.skeleton_from_file(path, BlobRuntime(), options)
    _, mirrored = video.skeleton_from_file(path, BlobRuntime(), options, mirror=True)
    assert straight.people == mirrored.people == 1 and mirrored.present[:, 0].all()
    x, y = straight.joints2d[:, 0, :, 0], straight.joints2d[:, 0, :, 1]
    assert (x < width / 2).all()
    np.testing.assert_allclose(mirrored.joints2d[:, 0, :, 0], width - 1 - x, atol=2.0)  # JPEG frames
    np.testing.assert_allclose(mirrored.joints2d[:, 0, :, 1], y, atol=2.0)


def test_pose_distance_is_in_torso_lengths_and_duplicates_go_by_score():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 200, (NUM_JOINTS, 2))
    shift = np.array([np.linalg.norm(a[4] - a[16]), 0.0])  # one torso (left shoulder to right hip)
    assert video.pose_distance(a, a + 0.3 * shift) == pytest.approx(0.3)
    assert video.pose_distance(3 * a, 3 * (a + 0.3 * shift)) == pytest.approx(0.3)  # any scale
    people = [
        {"uv": a + 0.2 * shift, "score": 0.4},  # the detector's order is kept...
        {"uv": a, "score": 0.7},
        {"uv": a + 2 * shift, "score": 0.35},  # someone else
    ]
    kept = video._distinct(people, 0.4)
    assert [p["score"] for p in kept] == [0.7, 0.35]  # ...but the weaker of the two close ones goes
    assert video._distinct(people, 0.1) == people and video._distinct(people, 0) == people
    assert video._distinct([], 0.4) == []


# ---- the exported (untrained) graphs on a drawn video ----------------------------------------------


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_untrained_pose_graphs_give_skeletons_in_the_pipeline_layout(runtime, tmp_path, suffix):
    path = write_video(tmp_path / f"walk{suffix}", stick_figure_frames(20))
    info, skeleton = video.skeleton_from_file(path, runtime)
    assert (info.width, info.height, info.fps) == (320, 180, 30.0)
    t = skeleton.frames
    assert (
        t == 20
        and skeleton.joints.shape == (3, t, NUM_JOINTS, MAX_PERSONS)
        and skeleton.joints.dtype == np.float32
    )
    assert skeleton.joints2d.shape == (t, MAX_PERSONS, NUM_JOINTS, 2) and skeleton.boxes.shape == (t, 2, 4)
    # the constant centre map gives two boxes in every frame; actor 1 is in every frame, and the other
    # track is actor 2 unless the file path's spread rule drops its (untrained, random) 3D joints
    present = skeleton.present
    assert present[:, 0].all() and skeleton.people in (1, 2) and present[:, 1].sum() in (0, t)
    assert (skeleton.joints[2][:, :, present.any(0)] > 0).all() and np.isfinite(skeleton.joints).all()
    # every 2D joint lies inside its person's square crop, mapped back to video pixels
    centre = (skeleton.boxes[..., :2] + skeleton.boxes[..., 2:]) / 2  # T, 2, 2
    side = np.maximum((skeleton.boxes[..., 2:] - skeleton.boxes[..., :2]).max(-1), 8.0) * runtime.crop_margin
    offset = np.abs(skeleton.joints2d - centre[:, :, None]).max(-1)  # T, 2, 25
    assert (offset[present] <= side[present][:, None] / 2 + 1e-3).all()
    one = video.video_to_skeleton(stick_figure_frames(20), runtime, max_people=1)
    assert one.people == 1 and not one.joints[..., 1].any() and not one.present[:, 1].any()


def test_video_errors_say_what_was_wrong(runtime, clip_path, tmp_path):
    def code(path, **options):
        with pytest.raises(video_io.VideoError) as caught:
            video.skeleton_from_file(path, runtime, video.VideoOptions(**options))
        return caught.value.code, caught.value.message

    short = write_video(tmp_path / "short.avi", stick_figure_frames(10))
    assert code(short) == ("too_short", "the video has 10 frames; at least 16 are needed (0.5 s at 30 fps)")
    fast = write_video(tmp_path / "fast.avi", stick_figure_frames(20), fps=1000)  # 0.02 s: 1 frame at 30 fps
    assert code(fast) == (
        "too_short",
        "the video has 1 frames; at least 16 are needed (0.5 s at 30 fps); counted at 30 fps: the file's "
        "20 frames at 1000 fps last 0.02 s",
    )
    assert code(clip_path, threshold=0.99)[0] == "no_person"  # the untrained centre map is 0.953
    assert "threshold 0.99" in code(clip_path, threshold=0.99)[1]
    assert code(clip_path, max_frames=30) == ("too_long", "the video has 40 frames; at most 30 are analysed")
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00AVI " + bytes(range(256)) * 8)
    assert code(garbage) == ("unreadable_video", "OpenCV cannot decode garbage.avi as a video")
    # frame sizes the detector cannot take: it scales each frame to its fixed width, so 16x8192 frames
    # (a 14 KB upload) took gigabytes before this check; small ones have no person to find
    for width, height in ((16, 1024), (8, 8), (4100, 64)):
        frames = [np.full((height, width, 3), 35, np.uint8)] * 4
        sized = write_video(tmp_path / f"size{width}x{height}.avi", frames)
        assert code(sized) == ("frame_size", f"the frames are {width}x{height} pixels; they need 16 to 4096 "
                               "pixels a side and at most 4 times as tall as wide")  # fmt: skip
        with pytest.raises(
            video_io.VideoError, match=f"are {width}x{height} pixels"
        ):  # whatever the header says
            video.video_to_skeleton(frames, runtime)
    assert (
        video.video_to_skeleton(stick_figure_frames(16, 80, 320), runtime, min_frames=1).frames == 16
    )  # 4:1
    assert code(tmp_path / "none.mp4")[0] == "unreadable_video"
    with pytest.raises(ValueError, match="max_people must be 1 to 2"):
        video.video_to_skeleton([], runtime, max_people=3)


def _numbered_frames(count: int) -> list[np.ndarray]:
    """Frames that say their index: a white bar whose left end moves 4 px per frame."""
    frames = []
    for i in range(count):
        frame = np.zeros((64, 480, 3), np.uint8)
        frame[16:48, 4 * i + 8 :] = 255
        frames.append(frame)
    return frames


def _frame_numbers(frames) -> list[int]:
    return [int(np.argmax(f[32, :, 1] > 128) - 8) // 4 for f in frames]


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (60.0, list(range(0, 90, 2))),  # every other frame: 1.5 s -> 45 frames
        (15.0, [k // 2 for k in range(180)]),  # each frame twice: 6 s -> 180 frames
        (25.0, [k * 25 // 30 for k in range(108)]),  # the frame on screen at k / 30 s: 3.6 s -> 108
        (29.97, list(range(90))),  # within 5% of 30: untouched
    ],
)
def test_videos_are_analysed_at_the_action_models_30_fps(tmp_path, fps, expected):
    """The action model's windows and motion are in NTU's 30 fps frames: a video at another rate is
    resampled to it by time (a 60 fps clip would otherwise look twice as slow, and be refused as too
    long after 15 s); max_frames counts the frames analysed."""
    path = write_video(tmp_path / "clip.avi", _numbered_frames(90), fps=fps)
    with video_io.open_video(path) as (info, frames):
        got = list(frames)
    numbers = _frame_numbers(got)
    assert abs(info.fps - fps) < 0.01 and info.analysed_fps == (fps if fps == 29.97 else 30.0)
    assert numbers == expected
    assert len({id(f) for f in got}) == len(got)  # a repeated frame is a copy (callers draw on them)
    with video_io.open_video(path, fps=0) as (info, frames):  # 0: every decoded frame
        assert _frame_numbers(frames) == list(range(90)) and info.analysed_fps == info.fps
    limit = len(got) - 1
    with (
        pytest.raises(video_io.VideoError, match=f"at most {limit} are analysed") as caught,
        video_io.open_video(path, max_frames=limit) as (_, frames),
    ):
        list(frames)
    assert caught.value.code == "too_long"
    with video_io.open_video(path, max_frames=len(got)) as (_, frames):
        assert len(list(frames)) == len(got)


class _Capture:
    """A stand-in for ``cv2.VideoCapture`` whose frames (2x2 pictures of their index) have the given
    timestamps (ms; None: a frame that fails to decode)."""

    def __init__(self, times_ms: list):
        self.times, self.i = times_ms, 0

    def read(self):
        self.i += 1
        if self.i > len(self.times) or self.times[self.i - 1] is None:
            return False, None
        return True, np.full((2, 2, 3), self.i - 1, np.uint8)

    def get(self, prop):
        assert prop == cv2.CAP_PROP_POS_MSEC
        return self.times[self.i - 1]


def _resampled(times_ms: list, fps: float, counted: bool = False) -> list[int]:
    # as open_video reads a video whose container says ``fps`` (and states its frame count: counted)
    clock = video_io.FrameClock(fps, overrule=not counted)
    timed = video_io._timed(_Capture(times_ms), len(times_ms), video_frames.FrameCount(), fps, clock)
    return [int(f[0, 0, 0]) for f in video_io.resample(timed, 30.0, clock.last_duration)]


def test_a_variable_rate_video_is_resampled_by_its_frames_times():
    """A phone's variable-rate video: 1 s at 60 fps, then 2 s at 30 fps, which the container calls
    40 fps. By frame number (3 frames of every 4) the first second lasted 1.5 s and the rest 1.5 s;
    by the frames' own times each second is 30 frames."""
    vfr = [1000 * i / 60 for i in range(60)] + [1000 + 1000 * i / 30 for i in range(60)]
    assert _resampled(vfr, 40.0) == [*range(0, 60, 2), *range(60, 120)]
    # a constant rate given to the millisecond (WebM, MKV): every frame once, as by frame number
    assert _resampled([round(1000 * i / 30) for i in range(90)], 30.0) == list(range(90))
    assert _resampled([round(1000 * i / 60) for i in range(90)], 60.0) == list(range(0, 90, 2))
    # no usable timestamps (all 0): the container's rate; a damaged frame: the one before stays on
    assert _resampled([0.0] * 50, 25.0) == [i * 25 // 30 for i in range(60)]
    damaged = [1000 * i / 30 for i in range(30)]
    damaged[10] = None
    assert _resampled(damaged, 30.0) == [*range(10), 9, *range(11, 30)]
    # damaged frames at the start keep their time: the first good frame stands in from 0
    damaged[:3] = [None] * 3
    assert _resampled(damaged, 30.0) == [3, 3, 3, *range(3, 10), 9, *range(11, 30)]
    # one frame stamped an hour ahead is a bad stamp, not an hour of that picture (nor of the next)
    jump = [1000 * i / 30 for i in range(90)]
    jump[10] = 3.6e6
    assert _resampled(jump, 30.0) == list(range(90))


def _capture_times(frames: int, seed: int = 0) -> list[int]:
    """A camera's frame times (ms): 30 fps on average, each interval 33 +- 8 ms."""
    steps = np.random.default_rng(seed).uniform(1000 / 30 - 8, 1000 / 30 + 8, frames - 1)
    return np.round(np.concatenate([[0.0], np.cumsum(steps)])).astype(int).tolist()


def test_a_container_rate_that_the_frames_times_contradict_gives_way(tmp_path):
    """A browser's MediaRecorder WebM has no frame rate nor duration in its header: OpenCV says
    1000 fps (the unit of its timestamps) and no frame count, for frames about 33 ms apart. By that
    rate each frame looked like a bad stamp and was put 1 ms after the one before: a 2 s recording
    became 2 frames, and the upload was refused as too short. The frames' own typical interval
    overrules a container rate it contradicts by more than 2x."""
    times = _capture_times(60)
    path = browser_recording(tmp_path / "recording.webm", _numbered_frames(60), times)
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == 1000.0 and capture.get(cv2.CAP_PROP_FRAME_COUNT) <= 0
    capture.release()
    with video_io.open_video(path) as (info, frames):
        numbers = _frame_numbers(frames)
    assert (info.fps, info.declared_frames, info.analysed_fps, info.read.decoded) == (1000.0, 0, 30.0, 60)
    # what the same frames at the same times give from a file that says its rate (30 fps), but for the
    # second frame's time, which no interval before it vouches for (it is put 1 ms after the first),
    # and the stamps within 1 ms of that rate's grid, which are snapped to it there
    said = browser_recording(tmp_path / "said.mkv", _numbered_frames(60), times, rate_in_header=True)
    with video_io.open_video(said) as (info, frames):
        reference = _frame_numbers(frames)
    assert info.fps == 30.0 and len(numbers) == len(reference)
    assert sum(a != b for a, b in zip(numbers, reference, strict=True)) <= 3
    steady = [1000 * i / 30 for i in range(90)]
    assert _resampled(steady, 1000.0) == list(range(90))  # was [0, 1, 2]
    assert _resampled(steady, 1.0) == list(range(90))  # the last frame lasts 1/30 s, not 1 s (30 copies)
    # a file that states its frame count keeps its rate: stamps 8x apart in a 30 fps file (an edit,
    # a slow-motion export) stay bad stamps, each frame shown once, not 8 times
    eight_apart = [8000 * i / 30 for i in range(30)]
    assert _resampled(eight_apart, 30.0, counted=True) == list(range(30))
    assert len(_resampled(eight_apart, 30.0)) == 240  # without a count the stamps decide
    assert len(numbers) in (59, 60, 61) and numbers == sorted(numbers) and numbers[-1] == 59
    assert len(set(numbers)) >= 55  # the jitter drops a few frames at 30 fps, no more


def test_a_damaged_frame_does_not_end_the_video(tmp_path):
    """OpenCV fails on a frame it cannot decode as it does at the end: the frames after a damaged
    one are read (they used to be lost), a damaged frame is shown as the one before it (so time is
    kept), the pose stage's indices stay those of the file (labels by frame number stay aligned), and
    the damage is counted."""
    clean = write_video(tmp_path / "clean.avi", _numbered_frames(60))
    path = tmp_path / "damaged.avi"
    path.write_bytes(damage_frames(clean.read_bytes(), [0, 20, 21, 59]))
    with video_io.open_video(path, fps=0) as (info, frames):
        numbers = _frame_numbers(list(frames))
    assert numbers == [1, *range(1, 20), 19, 19, *range(22, 59)]  # the last one ends the video
    assert (info.read.decoded, info.read.unreadable, info.declared_frames) == (56, 3, 60)
    capture = cv2.VideoCapture(str(path))
    count = video_frames.FrameCount()
    got = list(video_frames.read_frames(capture, 60, 3, count))
    capture.release()
    assert [i for i, _ in got] == [i for i in range(3, 60, 3) if i != 21]
    assert _frame_numbers(f for _, f in got) == [i for i, _ in got]
    assert (count.decoded, count.unreadable) == (18, 3)  # a grabbed frame that fails counts too
    # unknown length (a container without a count): it ends after MAX_UNREADABLE_RUN failures
    capture = cv2.VideoCapture(str(path))
    assert len(list(video_frames.read_frames(capture, 0))) == 56
    capture.release()
    # a known length: a damaged stretch longer than that is read through (40 frames here)
    path.write_bytes(damage_frames(write_video(tmp_path / "long.avi", _numbered_frames(100)).read_bytes(),
                                   list(range(30, 70))))  # fmt: skip
    with video_io.open_video(path, fps=0) as (info, frames):
        assert _frame_numbers(list(frames)) == [*range(30), *[29] * 40, *range(70, 100)]
    assert (info.read.decoded, info.read.unreadable) == (60, 40)
    with video_io.open_video(path) as (info, frames):  # by time at 30 fps: the same frames
        assert _frame_numbers(list(frames)) == [*range(30), *[29] * 40, *range(70, 100)]


def test_a_frame_count_that_lies_is_checked_before_a_video_is_refused(tmp_path):
    """An AVI whose stream header claims 100,000 frames holds 60: it is analysed, not refused as too
    long; a video that truly runs past the limit is still refused before decoding."""
    path = write_video(tmp_path / "clip.avi", _numbered_frames(60))
    data = bytearray(path.read_bytes())
    header = data.index(b"strh") + 8
    data[header + 32 : header + 36] = (100_000).to_bytes(4, "little")  # AVISTREAMHEADER.dwLength
    path.write_bytes(bytes(data))
    with video_io.open_video(path) as (info, frames):
        assert info.declared_frames == 100_000 and _frame_numbers(frames) == list(range(60))
    with pytest.raises(video_io.VideoError, match="the video has 100000 frames") as caught:
        video_io.open_video(path, max_frames=59).__enter__()  # frame 59 is there: refused at once
    assert caught.value.code == "too_long"


class _UnsureCapture:
    """``cv2.VideoCapture`` giving ``props`` (NaN, infinity: what a backend may say it does not know)."""

    def __init__(self, capture, props: dict):
        self._capture, self._props = capture, props

    def get(self, prop):
        return self._props.get(prop, self._capture.get(prop))

    def __getattr__(self, name):
        return getattr(self._capture, name)


@pytest.mark.parametrize("unknown", [float("nan"), float("inf")])
def test_a_frame_count_or_size_that_is_not_a_number_is_unknown(tmp_path, monkeypatch, unknown):
    """A frame count of NaN or infinity was int()-ed: a ValueError / OverflowError, a 500 at the
    endpoint. The count is then unknown (the frames are counted as decoded) and such a frame size
    is an unreadable video (422)."""
    path = write_video(tmp_path / "clip.avi", _numbered_frames(20))
    opened = cv2.VideoCapture
    props = {cv2.CAP_PROP_FRAME_COUNT: unknown}
    monkeypatch.setattr(video_io.cv2, "VideoCapture", lambda p: _UnsureCapture(opened(p), props))
    with video_io.open_video(path) as (info, frames):
        assert _frame_numbers(frames) == list(range(20)) and info.declared_frames == 0
    props[cv2.CAP_PROP_FRAME_WIDTH] = unknown
    with pytest.raises(video_io.VideoError, match="cannot decode") as caught:
        video_io.open_video(path).__enter__()
    assert caught.value.code == "unreadable_video"


@pytest.mark.parametrize("degrees", [90, 270])
def test_a_phone_portrait_video_is_read_upright(tmp_path, degrees):
    """A phone stores a portrait video as landscape frames and a rotation in the track header:
    OpenCV turns the frames, and the size is the turned one (the pose model needs people upright)."""
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:8, :16] = 255  # top left
    path = rotated_mp4(tmp_path / "portrait.mp4", [frame] * 20, degrees)
    with video_io.open_video(path) as (info, frames):
        got = list(frames)
    assert (info.width, info.height) == (48, 64) and len(got) == 20 and got[0].shape == (64, 48, 3)
    y, x = np.argwhere(got[0][..., 0] > 128).mean(0)
    assert (y < 16 and x > 32) if degrees == 90 else (y > 48 and x < 16)  # clockwise: top right


def test_uploads_are_recognised_by_name_type_and_content(clip_path):
    data = clip_path.read_bytes()
    assert (
        video_io.sniff_container(data[:16]) == ".avi"
        and video_io.sniff_container(b"\0\0\0\x20ftypisom") == ".mp4"
    )
    assert video_io.sniff_container(b"\0\0\0\x14ftypqt  ") == ".mp4"  # an iPhone's QuickTime .mov
    assert video_io.sniff_container(b"\x1a\x45\xdf\xa3\x9fB\x86\x81\x01") == ".mkv"  # WebM / Matroska
    assert video_io.sniff_container(b"hello world") is None
    assert (
        video_io.upload_suffix("a.MP4", None) == ".mp4"
        and video_io.upload_suffix("clip", "video/x-msvideo") == ".avi"
    )
    assert video_io.upload_suffix("IMG_0001.MOV", None) == ".mp4"
    assert video_io.upload_suffix("blob", "video/webm;codecs=vp8") == ".mkv"
    assert video_io.upload_suffix("clip", "video/quicktime") == ".mp4"
    assert video_io.upload_suffix("notes.txt", "text/plain") is None
    with video_io.saved_upload(io.BytesIO(data)) as path:  # an AVI is saved as .avi whatever its name
        assert path.suffix == ".avi" and path.read_bytes() == data
    assert not path.exists()
    for payload, words in ((b"", "empty"), (b"<html>nope</html>", "neither a RIFF/AVI header")):
        with pytest.raises(video_io.VideoError, match=words), video_io.saved_upload(io.BytesIO(payload)):
            pass


# ---- actions per window -------------------------------------------------------------------------


def test_action_windows_cover_the_video():
    assert video_actions.action_windows(40, 150, 75) == [(0, 40)]
    assert video_actions.action_windows(400, 0, 75) == [(0, 400)]
    assert video_actions.action_windows(300, 150, 75) == [(0, 150), (75, 225), (150, 300)]
    assert video_actions.action_windows(400, 150, 75) == [
        (0, 150),
        (75, 225),
        (150, 300),
        (225, 375),
        (250, 400),
    ]
    joints = np.zeros((3, 6, NUM_JOINTS, 2), np.float32)
    joints[..., 0, 1] = 1.0  # slot 1 in frames 0-5 (only joint 0 set: presence is any joint)
    joints[:, 1:3, 0, 0] = 2.0  # slot 0 in frames 1-2
    joints[:, 4] = 0  # nobody in frame 4
    x = video_actions.window_joints(joints, 0, 6)
    assert x.shape == (3, 5, NUM_JOINTS, 2)  # frame 4 dropped
    np.testing.assert_array_equal(x, joints[:, [0, 1, 2, 3, 5]])  # actor 1 (slot 0) stays first
    x = video_actions.window_joints(joints, 2, 6)
    assert x.shape == (3, 3, NUM_JOINTS, 2)  # frames 2, 3, 5
    assert (x[:, :, 0, 1] == 1.0).all() and x[0, :, 0, 0].tolist() == [2.0, 0.0, 0.0]  # actor 1: frame 2
    x = video_actions.window_joints(joints, 3, 6)  # actor 1 is not in frames 3-5: actor 2 moves up
    assert (x[:, :, 0, 0] == 1.0).all() and not x[..., 1].any()
    assert video_actions.window_joints(joints, 4, 5) is None


def test_skeleton_actions_are_the_served_models_predictions(tiny_bundle, action_model):
    joints = raw_files(tiny_bundle)[8][1]  # a real one-person sequence (3, T, 25, 2)
    reference = Reference(tiny_bundle, action_model.loader)
    (whole,) = video_actions.skeleton_to_actions(joints, action_model, window=0, top=2)
    assert (whole.start, whole.end) == (0, joints.shape[1]) and len(whole.prediction.top) == 2
    np.testing.assert_array_equal(
        video_actions.window_joints(joints, 0, joints.shape[1]), joints
    )  # one actor, no gap
    np.testing.assert_allclose(
        whole.prediction.probabilities, softmax(reference.scores(joints)[0]), atol=1e-5
    )
    windows = video_actions.skeleton_to_actions(joints, action_model, window=48, stride=40, top=3)
    spans = [(w.start, w.end) for w in windows]
    assert len(spans) >= 2 and spans == video_actions.action_windows(joints.shape[1], 48, 40)
    for w in windows:
        want = softmax(reference.scores(joints[:, w.start : w.end])[0])
        np.testing.assert_allclose(w.prediction.probabilities, want, atol=1e-5)
        assert w.prediction.frames == w.end - w.start
    with pytest.raises(video_io.VideoError, match="no window"):
        video_actions.skeleton_to_actions(np.zeros_like(joints), action_model)


def test_a_second_person_counts_only_when_the_model_names_a_two_person_action(tiny_bundle, action_model):
    one = raw_files(tiny_bundle)[8][1]  # a real one-person sequence (3, T, 25, 2)
    t = one.shape[1]
    pair = one.copy()
    pair[..., 1] = one[..., 0] + np.array([0.8, 0.0, 0.3])[:, None, None]  # a second body beside it
    inputs = video_actions.window_clips(pair, action_model, 0, 0)
    assert inputs.spans == [(0, t)] and inputs.pairs == [True] and inputs.counts == [t, t]
    alone = video_actions.window_clips(one, action_model, 0, 0)
    assert alone.pairs == [False] and len(alone.prepared) == 1
    np.testing.assert_array_equal(inputs.prepared[1], alone.prepared[0])  # the pair's actor 1 alone

    solo, both = _prediction("alone"), _prediction("together", id=50)  # 50: punching (two-person)
    assert inputs.choose([both, solo]) == [both]
    assert inputs.choose([_prediction("together", id=27), solo]) == [solo]  # 27 (jump up): one person
    assert alone.choose([both]) == [both]  # one actor: one input, taken as it is

    reference = Reference(tiny_bundle, action_model.loader)
    (whole,) = video_actions.skeleton_to_actions(pair, action_model, window=0, top=1)
    with_pair = softmax(reference.scores(pair)[0])
    ids = [label["id"] for label in action_model.labels]
    two_person = ids[int(np.argmax(with_pair))] in MUTUAL_ACTIONS
    want = with_pair if two_person else softmax(reference.scores(one)[0])
    np.testing.assert_allclose(whole.prediction.probabilities, want, atol=1e-5)


# ---- the annotated video --------------------------------------------------------------------------


def _prediction(name: str, id: int = 8) -> Prediction:
    top = [ClassScore(index=0, id=id, name=name, probability=0.9)]
    return Prediction(
        top=top, probabilities=[0.9, 0.1], scores=[1.0, 0.0], frames=4, clips=1, inference_ms=1.0
    )


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_annotate_draws_skeletons_boxes_and_labels(tmp_path, suffix):
    frames = [np.full((180, 320, 3), 100, np.uint8) for _ in range(8)]
    t, uv = 8, Camera().scaled(320, 180).project(np.tile([0.3, 0.0, 3.0], (NUM_JOINTS, 1)))
    present = np.zeros((t, 2), bool)
    present[:, 1] = True
    joints2d = np.zeros((t, 2, NUM_JOINTS, 2), np.float32)
    joints2d[:, 1] = uv  # every joint at one point: a filled dot in slot 1's colour
    boxes = np.zeros((t, 2, 4), np.float32)
    boxes[:, 1] = (20, 60, 80, 170)
    skeleton = video.VideoSkeleton(
        np.zeros((3, t, NUM_JOINTS, 2), np.float32), joints2d, np.zeros((t, 2, NUM_JOINTS), np.float32),
        boxes, np.zeros((t, 2), np.float32), present, (320, 180),
    )  # fmt: skip
    windows = [video_actions.WindowActions(0, 4, _prediction("sit down"))]
    out = tmp_path / f"annotated{suffix}"
    assert video_io.annotate(iter(frames), skeleton, windows, out, fps=25.0) == 8
    with video_io.open_video(out, fps=0) as (info, decoded):  # every frame, at the video's 25 fps
        back = list(decoded)
    assert (info.width, info.height, len(back)) == (320, 180, 8) and abs(info.fps - 25.0) < 0.01
    x, y = np.rint(uv[0]).astype(int)
    b, g, r = back[0][y, x].astype(int)
    assert r > g + 40 and r > b + 40  # slot 1's orange dot
    assert back[0][4, 4].max() < 60 and abs(int(back[6][4, 4].mean()) - 100) < 15  # label only in 0-3
    assert back[0][60, 50][2] > 150  # the box's top edge, orange
    with pytest.raises(ValueError, match=re.escape(".mp4 or .avi")):
        video_io.annotate(iter(frames), skeleton, windows, tmp_path / "x.gif")


# ---- the endpoint -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_bundle, exported):
    with serving(tiny_bundle.bundle_dir, pose_dir=exported.dir) as c:
        yield c


def _is_error(response, status: int, code: str, words: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"} and body["code"] == code, body
    assert words.lower() in body["detail"].lower(), body


def test_video_endpoint_names_the_actions_of_an_upload(client, clip_path, runtime, action_model, exported):
    data = clip_path.read_bytes()
    response = client.post("/v1/predict/video", files={"file": ("walk.avi", data, "video/x-msvideo")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["frames"], body["width"], body["height"], body["fps"]) == (40, 320, 180, 30.0)
    assert body["analysed_fps"] == 30.0
    assert (body["declared_frames"], body["decoded_frames"], body["unreadable_frames"]) == (40, 40, 0)
    _, skeleton = video.skeleton_from_file(clip_path, runtime)  # the CLI's path gives the same answer
    assert (body["people"], body["frames_with_people"]) == (skeleton.people, 40)
    assert body["pose_model"]["version"] == runtime.version and body["skeletons"] is None
    assert body["model"]["name"] == action_model.meta["name"]
    assert client.get("/v1/model").json()["runtime"]["video"]["version"] == runtime.version
    (window,) = body["windows"]
    assert (window["start"], window["end"]) == (0, 40) and len(window["prediction"]["top"]) == 3
    (want,) = video_actions.skeleton_to_actions(skeleton.joints, action_model)
    np.testing.assert_allclose(
        window["prediction"]["probabilities"], want.prediction.probabilities, atol=1e-5
    )
    timing = body["timing"]
    assert timing["total_ms"] >= timing["pose_ms"] > 0 and timing["pose_frames_per_s"] > 0
    with_skeletons = client.post(
        "/v1/predict/video", files={"file": ("walk.avi", data)}, data={"skeletons": "true"}
    ).json()["skeletons"]
    assert np.asarray(with_skeletons["joints"]).shape == (3, 40, NUM_JOINTS, 2)
    assert np.asarray(with_skeletons["joints2d"]).shape == (40, 2, NUM_JOINTS, 2)
    np.testing.assert_allclose(with_skeletons["joints"], skeleton.joints, atol=1e-4)
    query = client.post("/v1/predict/video?skeletons=true", files={"file": ("walk.avi", data)}).json()
    assert np.asarray(query["skeletons"]["boxes"]).shape == (40, 2, 4)


def test_video_endpoint_refuses_bad_uploads(client, tmp_path):
    post = lambda **kw: client.post("/v1/predict/video", **kw)  # noqa: E731
    _is_error(
        post(files={"file": ("x.avi", b"\x00garbage" * 100)}), 422, "unreadable_video", "not an avi, mp4"
    )
    riff = b"RIFF\x00\x00\x00\x00AVI " + bytes(range(256)) * 4
    _is_error(post(files={"file": ("x.avi", riff)}), 422, "unreadable_video", "opencv cannot decode")
    _is_error(post(files={"file": ("x.mp4", b"")}), 422, "empty", "empty")
    _is_error(
        post(files={"file": ("notes.txt", b"hello", "text/plain")}), 415, "unsupported_media_type", ".mp4"
    )
    _is_error(  # neither named nor typed as a video, nor starting as one
        post(files={"file": ("clip", b"hello", "application/octet-stream")}),
        415,
        "unsupported_media_type",
        "'clip', application/octet-stream",
    )
    _is_error(post(files={"other": ("x.avi", b"1")}), 422, "missing_file", "'file'")
    _is_error(post(json={"file": "x"}), 415, "unsupported_media_type", "multipart")
    short = write_video(tmp_path / "short.avi", stick_figure_frames(10)).read_bytes()
    _is_error(post(files={"file": ("short.avi", short)}), 422, "too_short", "at least 16")
    tall = write_video(tmp_path / "tall.avi", [np.full((2048, 16, 3), 35, np.uint8)] * 8).read_bytes()
    _is_error(post(files={"file": ("tall.avi", tall)}), 422, "frame_size", "at most 4 times as tall")


@pytest.mark.parametrize(
    ("name", "media"),
    [("IMG_0001.MOV", "video/quicktime"), ("recording.webm", "video/webm"), ("VID_0001.3gp", "video/3gpp")],
)
def test_video_endpoint_takes_phone_and_browser_recordings(client, tmp_path, name, media):
    """An iPhone's QuickTime .mov and a browser MediaRecorder's WebM (VP8) were refused with 415, and
    so was an Android phone's 3GPP .3gp (ISO media, as MP4); OpenCV decodes them all. Their content
    decides how they are read, whatever their name."""
    path = write_video(
        tmp_path / Path(name).with_suffix(Path(name).suffix.lower()).name, stick_figure_frames(40)
    )
    response = client.post("/v1/predict/video", files={"file": (name, path.read_bytes(), media)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["frames"], body["decoded_frames"], body["width"], body["height"]) == (40, 40, 320, 180)
    assert body["frames_with_people"] == 40 and len(body["windows"]) == 1


def test_video_endpoint_takes_a_video_by_its_content_when_nothing_names_it(client, tmp_path):
    """``curl -F file=@clip`` sends a file without a suffix as application/octet-stream: it was
    refused with 415 although it is an AVI; its first bytes say what it is."""
    path = write_video(tmp_path / "clip.avi", stick_figure_frames(40))
    response = client.post(
        "/v1/predict/video", files={"file": ("clip", path.read_bytes(), "application/octet-stream")}
    )
    assert response.status_code == 200, response.text
    assert response.json()["decoded_frames"] == 40


def test_video_endpoint_takes_a_browser_recording_without_a_frame_rate(client, tmp_path):
    """A browser's MediaRecorder WebM (no rate nor duration in its header: OpenCV says 1000 fps)
    was analysed as 1-2 frames and refused as too short; its frames' own times give its length. One
    that is truly too short says how many frames it held (it said "0 frames ... last 0.00 s")."""
    path = browser_recording(tmp_path / "recording.webm", stick_figure_frames(40), _capture_times(40))
    response = client.post("/v1/predict/video", files={"file": ("blob", path.read_bytes(), "video/webm")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["fps"], body["analysed_fps"], body["declared_frames"], body["decoded_frames"]) == (
        1000.0, 30.0, 0, 40,
    )  # fmt: skip
    assert body["frames"] in (39, 40, 41) and body["frames_with_people"] == body["frames"]
    short = browser_recording(tmp_path / "short.webm", stick_figure_frames(8), _capture_times(8))
    _is_error(
        client.post("/v1/predict/video", files={"file": ("short.webm", short.read_bytes())}),
        422,
        "too_short",
        "the video has 8 frames; at least 16 are needed (0.5 s at 30 fps); counted at 30 fps from the "
        "file's 8 decoded frames",
    )


def test_video_endpoint_size_limit(tiny_bundle, exported, clip_path):
    app = create_app(settings_for(tiny_bundle.bundle_dir, pose_dir=exported.dir, max_video_bytes=4096))
    c = TestClient(app)  # the limit is checked before any model is needed
    _is_error(
        c.post("/v1/predict/video", files={"file": ("walk.avi", clip_path.read_bytes())}),
        413,
        "too_large",
        "4096",
    )


def test_without_a_pose_model_only_the_video_endpoint_is_unavailable(
    tiny_bundle, tmp_path, clip_path, files_clip
):
    with serving(tiny_bundle.bundle_dir, pose_dir=tmp_path / "nowhere") as c:
        response = c.post("/v1/predict/video", files={"file": ("walk.avi", clip_path.read_bytes())})
        _is_error(response, 503, "no_pose_model", "NTU_SERVE_POSE_DIR")
        assert "no pose.json" in response.json()["detail"]
        assert c.get("/ready").status_code == 200
        assert "no pose.json" in c.get("/v1/model").json()["runtime"]["video"]["unavailable"]
        assert c.post("/v1/predict", json={"clip": files_clip}).status_code == 200


@pytest.fixture(scope="module")
def files_clip(tiny_bundle):
    return as_clip(raw_files(tiny_bundle)[8][1], 1)


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_prints_actions_and_writes_the_annotated_video(
    exported, tiny_bundle, clip_path, tmp_path, capsys
):
    out = tmp_path / "annotated.mp4"
    argv = [
        "--video",
        str(clip_path),
        "--pose-dir",
        str(exported.dir),
        "--bundle-dir",
        str(tiny_bundle.bundle_dir),
    ]
    assert video.main([*argv, "--out", str(out), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"video: 40 frames 320x180 at 30.0 fps; [12] person\(s\), in 40 frames", printed)
    (line,) = [s for s in printed.splitlines() if s.startswith("frames 0-39: ")]
    assert len(line.split(", ")) == 2 and f"annotated video: {out} (40 frames)" in printed
    with video_io.open_video(out) as (info, frames):
        assert (info.width, info.height, sum(1 for _ in frames)) == (320, 180, 40)


def test_cli_errors_exit_2_with_the_reason(exported, tiny_bundle, clip_path, tmp_path, capsys):
    base = ["--pose-dir", str(exported.dir), "--bundle-dir", str(tiny_bundle.bundle_dir)]
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video")
    short = write_video(tmp_path / "short.avi", stick_figure_frames(10))
    cases = [
        (["--video", str(garbage), *base], "OpenCV cannot decode garbage.mp4"),
        (["--video", str(short), *base], "10 frames; at least 16 are needed"),
        (["--video", str(clip_path), *base, "--threshold", "0.99"], "no person was found in any of the 40"),
        (["--video", str(short), "--pose-dir", str(tmp_path), "--bundle-dir", "x"], "no pose.json"),
        (
            ["--video", str(short), "--pose-dir", str(exported.dir), "--bundle-dir", str(tmp_path)],
            "no manifest",
        ),
    ]
    for argv, words in cases:
        assert video.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("video: error: ") and words in err, err


def test_cli_runs_as_a_module(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "serving.video", "--video", "x.avi", "--pose-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "video: error:" in done.stderr and "no pose.json" in done.stderr
