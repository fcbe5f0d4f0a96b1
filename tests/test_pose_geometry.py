"""Lifting to camera space, the person tracker, and the 2D/3D consistency of pose augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from models.pose_geometry import Camera, Tracker, box_iou, solve_translation
from models.skeleton import FLIP_INDEX, SPINE_MIDDLE
from stages.pose_dataset import AugmentParams, augment_crop, crop_affine, flip_frame, rotate_3d
from stages.synth.camera import project_color


def _body(rng) -> np.ndarray:
    xyz = rng.normal(0, 0.3, (25, 3)) * [1.0, 2.0, 0.3]
    return xyz - xyz[SPINE_MIDDLE]


def test_camera_matches_the_synthetic_projection_and_scales():
    xyz = np.array([[0.2181813, 0.1725006, 3.785027], [-0.5, -0.8, 2.5]])
    np.testing.assert_allclose(Camera().project(xyz), project_color(xyz), atol=1e-9)
    small = Camera().scaled(640, 360)
    np.testing.assert_allclose(small.project(xyz), project_color(xyz) / 3.0, atol=1e-9)
    assert Camera().scaled(640, 480).f == small.f  # 4:3: the width keeps the Kinect's 83 degrees
    portrait = Camera().scaled(1080, 1920)  # a phone held upright: the long side does
    assert portrait.f == Camera().f and np.allclose((portrait.cx, portrait.cy), (540.0, 568.4 * 1920 / 1080))
    fov = np.degrees(2 * np.arctan([1920 / 2 / portrait.f, 1080 / 2 / portrait.f]))
    np.testing.assert_allclose(fov, [83.3, 53.1], atol=0.1)


@pytest.mark.parametrize("width", [1920, 640])
def test_solve_translation_recovers_the_root(width):
    rng = np.random.default_rng(0)
    camera = Camera().scaled(width, width * 9 // 16)
    for _ in range(20):
        rel = _body(rng)
        root = np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 0.5), rng.uniform(1.8, 5.0)])
        uv = camera.project(rel + root)
        t = solve_translation(rel, uv, np.ones(25), camera)
        np.testing.assert_allclose(t, root, atol=1e-6)


def test_solve_translation_ignores_zero_weight_joints_and_tolerates_noise():
    rng = np.random.default_rng(1)
    camera = Camera()
    rel, root = _body(rng), np.array([0.3, -0.2, 3.2])
    uv = camera.project(rel + root)
    weights = np.ones(25)
    uv[5] += 500.0  # a wild joint, weighted out
    weights[5] = 0.0
    np.testing.assert_allclose(solve_translation(rel, uv, weights, camera), root, atol=1e-6)
    noisy = camera.project(rel + root) + rng.normal(0, 2.0, (25, 2))  # 2 px of noise
    assert np.abs(solve_translation(rel, noisy, np.ones(25), camera) - root).max() < 0.1
    with pytest.raises(ValueError, match="two joints"):
        solve_translation(rel, uv, np.eye(25)[0], camera)


def test_tracker_keeps_slots_through_crossing_and_misses():
    tracker = Tracker(max_age=5)
    box = lambda x: np.array([x - 40, 100, x + 40, 300.0])  # noqa: E731
    assert tracker.update(np.stack([box(500), box(100)])) == [1, 0]  # left person -> slot 0
    slots = []
    for step in range(20):  # they walk towards each other; the order of detections is shuffled
        a, b = box(100 + 10 * step), box(500 - 10 * step)
        order = step % 2
        got = tracker.update(np.stack([b, a] if order else [a, b]))
        slots.append(got[::-1] if order else got)
    assert all(s == [0, 1] for s in slots)
    # person 1 (slot 1) is missed for 3 frames, then comes back near where it was
    for _ in range(3):
        assert tracker.update(box(300)[None]) == [0]
    assert tracker.update(np.stack([box(312), box(300)])) == [1, 0]
    assert tracker.ids == [0, 1]  # the same two tracks all along


def test_tracker_starts_a_new_track_id_for_a_new_person():
    tracker = Tracker(max_age=2)
    near = np.array([100, 100, 200, 300.0])
    assert tracker.ids == [-1, -1]
    tracker.update(near[None])
    assert tracker.ids == [0, -1]
    tracker.update(np.stack([near + 3, near + np.array([900, 0, 900, 0])]))  # a second person arrives
    assert tracker.ids == [0, 1]
    tracker.update(np.stack([near + 6, near + np.array([450, 0, 450, 0])]))  # slot 1 taken by a far box
    assert tracker.ids == [0, 2]
    for _ in range(3):  # slot 0 unseen beyond max_age: freed
        tracker.update((near + np.array([450, 0, 450, 0]))[None])
    tracker.update(np.stack([near + np.array([450, 0, 450, 0]), near]))
    assert tracker.ids == [3, 2]  # the returning person is a new track; the other continues


def test_tracker_gives_a_new_far_person_a_free_slot():
    tracker = Tracker()
    near = np.array([100, 100, 200, 300.0])
    assert tracker.update(near[None]) == [0]
    assert tracker.update(np.stack([near + 3, near + np.array([900, 0, 900, 0])])) == [0, 1]


def test_box_iou():
    assert box_iou(np.array([0, 0, 2, 2.0]), np.array([1, 0, 3, 2.0])) == pytest.approx(1 / 3)
    assert box_iou(np.array([0, 0, 1, 1.0]), np.array([2, 2, 3, 3.0])) == 0.0


@pytest.mark.parametrize("flip", [False, True])
def test_crop_affine_and_rotate_3d_agree(flip):
    """Under a weak-perspective camera (u ~ x, v ~ -y) the 2D and 3D augmentations move a root-relative
    skeleton the same way, so the labels stay consistent."""
    rng = np.random.default_rng(2)
    rel = _body(rng)
    size, k = 128, 60.0
    c = (size - 1) / 2
    uv = np.stack([c + k * rel[:, 0], c - k * rel[:, 1]], axis=1)
    matrix = crop_affine(size, 1.0, 25.0, flip, (0.0, 0.0))
    moved_uv = uv @ matrix[:, :2].T + matrix[:, 2]
    moved = rotate_3d(rel, 25.0, flip)
    expect = np.stack([c + k * moved[:, 0], c - k * moved[:, 1]], axis=1)
    np.testing.assert_allclose(moved_uv, expect, atol=1e-9)


def test_augment_crop_swaps_left_and_right_on_flip():
    rng = np.random.default_rng(3)
    image = np.zeros((64, 64, 3), np.uint8)
    uv = rng.uniform(10, 54, (25, 2))
    xyz = _body(rng)
    vis = np.ones(25, np.float32)
    aug = AugmentParams(scale=0.0, rotation=0.0, flip=1.0, shift=0.0, brightness=0.0, contrast=0.0, blur=0.0,
                        other_jitter=0.0, other_drop=0.0)  # fmt: skip
    other = np.array([40.0, 2.0, 60.0, 50.0], np.float32)
    _, uv2, xyz2, _, other2 = augment_crop(image, uv, xyz, vis, rng, aug, other)
    flip = list(FLIP_INDEX)
    np.testing.assert_allclose(uv2[:, 0], 63 - uv[flip, 0])
    np.testing.assert_allclose(uv2[:, 1], uv[flip, 1])
    np.testing.assert_allclose(xyz2[:, 0], -xyz[flip, 0])
    np.testing.assert_allclose(other2, [3.0, 2.0, 23.0, 50.0])  # the other person's box mirrored too
    # a joint pushed outside the crop by the augmentation stops counting as visible
    uv[0] = [-5.0, 30.0]
    still = AugmentParams(scale=0.0, rotation=0.0, flip=0.0, shift=0.0)
    _, _, _, vis3, none = augment_crop(image, uv, xyz, vis, rng, still)
    assert vis3[0] == 0.0 and vis3[1:].all() and np.isnan(none).all()  # no peer: no box


def test_other_box_moves_with_the_crop_and_is_dropped_as_a_detector_miss():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    peer = rng.uniform(5, 59, (25, 2))  # the other person's joints in the crop
    box = np.concatenate([peer.min(0), peer.max(0)]).astype(np.float32)
    uv, xyz, vis = rng.uniform(10, 54, (25, 2)), _body(rng), np.ones(25, np.float32)
    exact = AugmentParams(rotation=0.0, other_jitter=0.0, other_drop=0.0)  # zoom, shift, flip: axis-aligned
    for seed in range(6):
        matrix_rng, aug_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        scale = float(matrix_rng.uniform(1 - exact.scale, 1 + exact.scale))
        matrix_rng.uniform(-0.0, 0.0)  # the rotation draw
        flip = bool(matrix_rng.random() < exact.flip)
        shift = tuple(matrix_rng.uniform(-exact.shift, exact.shift, 2) * 64)
        matrix = crop_affine(64, scale, 0.0, flip, shift)
        moved = peer @ matrix[:, :2].T + matrix[:, 2]
        *_, got = augment_crop(image, uv, xyz, vis, aug_rng, exact, box)
        np.testing.assert_allclose(got, np.concatenate([moved.min(0), moved.max(0)]), atol=1e-3)
    turned = augment_crop(image, uv, xyz, vis, rng, AugmentParams(rotation=30.0, other_jitter=0.0,
                                                                  other_drop=0.0), box)[4]  # fmt: skip
    assert (turned[2:] - turned[:2] > box[2:] - box[:2] - 1e-3).all()  # a turned box's frame is no smaller
    jittered = augment_crop(image, uv, xyz, vis, rng, AugmentParams(other_drop=0.0, other_jitter=0.2), box)[4]
    assert np.isfinite(jittered).all()
    dropped = augment_crop(image, uv, xyz, vis, rng, AugmentParams(other_drop=1.0), box)[4]
    assert np.isnan(dropped).all()


def test_flip_frame_mirrors_boxes_and_keeps_empty_rows():
    image = np.zeros((32, 100, 3), np.uint8)
    image[:, 10] = 255
    boxes = np.array([[10, 5, 30, 25], [0, 0, 0, 0]], np.float32)
    flipped, out = flip_frame(image, boxes)
    assert flipped[0, 89].any() and not flipped[0, 10].any()
    np.testing.assert_allclose(out, [[69, 5, 89, 25], [0, 0, 0, 0]])
