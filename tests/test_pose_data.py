"""The pose_data stage (video + .skeleton pairs -> crops and targets) and the train_pose stage on it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from models.pose import PoseLossWeights
from models.pose_geometry import Camera, solve_translation
from models.skeleton import SPINE_MIDDLE
from stages import pose_data, train_pose
from stages import render as render_stage
from stages.ntu_files import NTU120_XSUB_TRAIN_SUBJECTS
from stages.params import ParamsError
from stages.pose_dataset import AugmentParams, CropDataset, load_split, other_boxes
from stages.skeleton_text import parse_skeleton
from stages.synthesize import SynthesizeParams
from stages.synthesize import run as synthesize
from stages.training import Recipe, load_checkpoint
from tests.pose_helpers import damage_frames

TINY = SynthesizeParams(
    seed=7,
    classes=(8, 50),
    num_subjects=2,
    num_setups=1,
    num_sessions=2,
    workers=1,
    unusable_rate=0.0,
    short_noise_rate=0.5,
)
RENDER = render_stage.RenderParams(width=320, videos_per_class=4, workers=1)
PARAMS = pose_data.PoseDataParams(
    frame_stride=6,
    crop_size=64,
    frame_width=160,
    frame_every=2,
    workers=1,
    shard_samples=64,
    chunk_samples=32,
)


@pytest.fixture(scope="module")
def pose_pairs(tmp_path_factory):
    """TINY's corpus, 8 rendered videos (2 classes x 4) and the pose_data stage run on them."""
    root = tmp_path_factory.mktemp("pose")
    synthesize(TINY, out_dir=root / "raw")
    render_stage.run(RENDER, TINY, raw_dir=root / "raw", out_dir=root / "rgb")
    summary = pose_data.run(PARAMS, video_dir=root / "rgb", skeleton_dir=root / "raw", out_dir=root / "pose")
    return root, summary


def test_crops_carry_the_file_labels_mapped_into_the_crop(pose_pairs):
    root, summary = pose_pairs
    assert summary["videos_ok"] == summary["videos"] == 8 and summary["crops"] > 0
    group = zarr.open_group(str(root / "pose" / "pose.zarr"), mode="r")
    videos = pq.read_table(root / "pose" / "videos.parquet").to_pylist()
    assert group["crops"].shape[1:] == (64, 64, 3)
    i = group["crops"].shape[0] // 2
    video = videos[group["crop_video"][i]]
    frame = int(group["crop_frame"][i])
    raw = parse_skeleton((root / "raw" / f"{video['name']}.skeleton").read_bytes())
    records = np.flatnonzero(raw.frame_index == frame)
    scale = RENDER.width / 1920
    cx, cy, side = group["crop_box"][i]
    k = 64 / side
    expected = [(raw.colors[r] * scale - [cx - side / 2, cy - side / 2]) * k for r in records]
    uv = group["joints2d"][i]
    assert min(np.abs(uv - e).max() for e in expected) < 1e-3  # one of the frame's people, exactly
    r = records[int(np.argmin([np.abs(uv - e).max() for e in expected]))]
    np.testing.assert_allclose(group["joints3d"][i], raw.joints[r] - raw.joints[r][SPINE_MIDDLE], atol=1e-6)
    # the crop shows the person: the labelled joints sit on pixels unlike the crop's border
    crop = group["crops"][i].astype(float)
    inside = (uv >= 0).all(1) & (uv < 63).all(1)
    at_joints = crop[np.round(uv[inside, 1]).astype(int), np.round(uv[inside, 0]).astype(int)]
    assert np.abs(at_joints - crop[0, 0]).sum(1).mean() > 20
    assert video["ntu120_xsub"] in ("train", "test")


def test_crop_labels_lift_back_to_camera_space(pose_pairs):
    """The stored 2D (crop) and 3D (root-relative) labels are consistent with the colour camera."""
    root, _ = pose_pairs
    group = zarr.open_group(str(root / "pose" / "pose.zarr"), mode="r")
    i = 0
    cx, cy, side = group["crop_box"][i]
    uv_video = group["joints2d"][i] * side / 64 + [cx - side / 2, cy - side / 2]
    camera = Camera().scaled(320, 180)
    t = solve_translation(group["joints3d"][i].astype(float), uv_video, np.ones(25), camera)
    np.testing.assert_allclose(camera.project(group["joints3d"][i] + t), uv_video, atol=0.05)
    assert 1.0 < t[2] < 8.0


def test_ghost_bodies_are_not_labelled(pose_pairs):
    """Short noise bodies (<= 11 frames; half of TINY's files have them) give no crops or boxes."""
    root, _ = pose_pairs
    group = zarr.open_group(str(root / "pose" / "pose.zarr"), mode="r")
    videos = pq.read_table(root / "pose" / "videos.parquet").to_pylist()
    corpus = json.loads((root / "raw" / "corpus.json").read_text())
    faults = {s["name"]: s["faults"] for s in corpus["samples"]}
    per_frame = {}
    for v, f in zip(group["crop_video"][:], group["crop_frame"][:], strict=True):
        per_frame[(int(v), int(f))] = per_frame.get((int(v), int(f)), 0) + 1
    for (v, _), count in per_frame.items():
        name = videos[v]["name"]
        assert count <= (2 if name.endswith("A050") else 1), (name, faults[name])


def test_bad_pairs_are_rejected_with_reasons_and_the_rest_kept(pose_pairs, tmp_path):
    root, _ = pose_pairs
    videos = tmp_path / "videos"
    shutil.copytree(root / "rgb", videos)
    good = sorted(videos.glob("*_rgb.avi"))
    (videos / "S001C001P099R001A008_rgb.avi").write_bytes(b"not a video at all")  # no skeleton, garbage
    broken = good[0].name.replace("_rgb.avi", "")
    (tmp_path / "raw").mkdir()
    for p in (root / "raw").glob("*.skeleton"):
        shutil.copy(p, tmp_path / "raw" / p.name)
    (tmp_path / "raw" / "S001C001P099R001A008.skeleton").write_bytes(b"3\r\n")
    (tmp_path / "raw" / f"{broken}.skeleton").write_bytes(b"garbage\r\n")
    (videos / "S001C002P098R001A008_rgb.avi").write_bytes(good[1].read_bytes())  # no .skeleton at all
    (videos / "clip_rgb.avi").write_bytes(good[2].read_bytes())  # a readable pair, but not an NTU name
    shutil.copy(
        root / "raw" / good[2].name.replace("_rgb.avi", ".skeleton"), tmp_path / "raw" / "clip.skeleton"
    )
    summary = pose_data.run(PARAMS, video_dir=videos, skeleton_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    rejected = summary["rejected"]
    assert set(rejected) == {broken, "S001C001P099R001A008", "S001C002P098R001A008", "clip"}
    assert "no_skeleton" in rejected["S001C002P098R001A008"] and "bad_name" in rejected["clip"]
    assert summary["videos_ok"] == len(good) - 1
    rows = pq.read_table(tmp_path / "out" / "videos.parquet").to_pylist()
    assert summary["crops"] == sum(r["crops"] for r in rows if r["status"] == "ok")  # nothing kept of "clip"


def test_a_damaged_frame_is_skipped_and_the_later_frames_keep_their_labels(pose_pairs, tmp_path):
    """A frame OpenCV cannot decode used to end the video silently (the rest of its crops lost)."""
    root, _ = pose_pairs
    video = sorted((root / "rgb").glob("*_rgb.avi"))[0]
    name = video.name[: -len("_rgb.avi")]
    skeleton = str(root / "raw" / f"{name}.skeleton")
    damaged = tmp_path / video.name
    damaged.write_bytes(damage_frames(video.read_bytes(), [12, 13]))  # frame 12 is read, 13 grabbed
    row, clean = pose_data.process_pair(pose_data.Pair(name, str(video), skeleton), PARAMS)
    assert row["status"] == "ok" and row["reason"] == ""
    row, got = pose_data.process_pair(pose_data.Pair(name, str(damaged), skeleton), PARAMS)
    assert row["status"] == "ok"
    assert row["reason"] == "unreadable_frames: 2 frame(s) could not be decoded; skipped"
    keep = clean["crop_frame"] != 12
    assert 0 < keep.sum() < len(keep) and clean["crop_frame"].max() > 12
    np.testing.assert_array_equal(got["crop_frame"], clean["crop_frame"][keep])
    for key in ("crops", "joints2d", "joints3d"):
        np.testing.assert_array_equal(got[key], clean[key][keep])


def _edit_skeleton(text: str, edit) -> str:
    """``text`` of a ``.skeleton`` file with ``edit(frame, bodies) -> bodies`` applied to every frame,
    ``bodies`` being each body's lines (its info line, ``25`` and the 25 joint lines)."""
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    out, at = [lines[0]], 1
    for frame in range(int(lines[0])):
        count = int(lines[at])
        bodies = [lines[at + 1 + 27 * b : at + 1 + 27 * (b + 1)] for b in range(count)]
        at += 1 + 27 * count
        bodies = edit(frame, bodies)
        out += [str(len(bodies)), *(line for body in bodies for line in body)]
    return "\r\n".join(out + lines[at:])


def _off_frame(body: list[str]) -> list[str]:
    """The body with every joint's colour position moved far left of the picture."""
    joints = [line.split() for line in body[2:]]
    for j in joints:
        j[5] = "-5000.0"
    return body[:2] + [" ".join(j) for j in joints]


def test_detector_frames_keep_only_complete_labels(pose_pairs, tmp_path):
    """A frame is a detector target only when nobody in view lacks a box: a person dropped by
    min_joints removes it always; a frame whose Kinect labels miss someone removes it for real
    datasets (there the person is usually still in view), not for the synthetic renders (which draw
    exactly the labelled bodies). Real datasets also exclude the official missing-skeleton list."""
    root, _ = pose_pairs
    videos, raw = tmp_path / "videos", tmp_path / "raw"
    videos.mkdir(), raw.mkdir()
    name = sorted(root.glob("rgb/*A008_rgb.avi"))[0].name.removesuffix("_rgb.avi")
    step = PARAMS.frame_stride * PARAMS.frame_every  # every detector frame's index is a multiple
    text = (root / "raw" / f"{name}.skeleton").read_text()
    with_body = sorted({f for f in range(0, int(text.split()[0]), step)} & set(
        parse_skeleton(text.encode()).frame_index.tolist()))  # fmt: skip
    lost, outside = with_body[1:3], with_body[4]

    def edit(frame, bodies):
        return [] if frame in lost else [_off_frame(b) for b in bodies] if frame == outside else bodies

    (raw / f"{name}.skeleton").write_text(_edit_skeleton(text, edit), newline="")
    shutil.copy(root / "rgb" / f"{name}_rgb.avi", videos)
    missing = "S001C002P005R002A008"  # in the official NTU-120 list: a real dataset skips it
    shutil.copy(root / "rgb" / f"{name}_rgb.avi", videos / f"{missing}_rgb.avi")
    shutil.copy(root / "raw" / f"{name}.skeleton", raw / f"{missing}.skeleton")
    unreadable = "S001C001P098R001A008"
    shutil.copy(root / "rgb" / f"{name}_rgb.avi", videos / f"{unreadable}_rgb.avi")
    (raw / f"{unreadable}.skeleton").mkdir()  # found, but reading it fails

    def detector_frames(dataset):
        out = tmp_path / dataset
        summary = pose_data.run(PARAMS, video_dir=videos, skeleton_dir=raw, out_dir=out, dataset=dataset)
        group = zarr.open_group(str(out / "pose.zarr"), mode="r")
        rows = pq.read_table(out / "videos.parquet").to_pylist()
        mine = group["frame_video"][:] == next(r["index"] for r in rows if r["name"] == name)
        people = (np.abs(group["frame_boxes"][:][mine]).sum(-1) > 0).sum(-1)
        return summary, dict(zip(group["frame_index"][:][mine].tolist(), people.tolist(), strict=True))

    synthetic, frames = detector_frames("synthetic")
    assert outside not in frames and all(frames[f] == 0 for f in lost)  # empty renders: negatives
    assert set(synthetic["rejected"]) == {unreadable}
    assert "unreadable_skeleton" in synthetic["rejected"][unreadable]
    assert synthetic["frames_skipped"] == 1 and synthetic["labels"] == "complete"
    real, real_frames = detector_frames("ntu120")
    assert outside not in real_frames and not set(lost) & set(real_frames)
    assert set(real_frames.values()) == {1} and set(real_frames) == set(frames) - set(lost) - {
        f for f, n in frames.items() if n == 0}  # fmt: skip
    assert real["frames_skipped"] == len(frames) + 1 - len(real_frames) and real["labels"] == "kinect"
    assert "missing_list" in real["rejected"][missing] and real["videos_ok"] == synthetic["videos_ok"] - 1
    assert real["crops"] < synthetic["crops"]  # the missing-list pair's crops are gone, nothing else
    assert (
        synthetic["crops"] - real["crops"]
        == pq.read_table(tmp_path / "synthetic" / "videos.parquet").to_pylist()[
            [r["name"] for r in pq.read_table(tmp_path / "synthetic" / "videos.parquet").to_pylist()].index(
                missing
            )
        ]["crops"]
    )


def test_params_are_checked():
    with pytest.raises(ParamsError, match="crop_size"):
        dataclasses.replace(PARAMS, crop_size=100).validate()
    with pytest.raises(ParamsError, match="frame_every"):
        dataclasses.replace(PARAMS, frame_every=0).validate()
    train = train_pose.TrainPoseParams(
        recipe=Recipe(optimizer="adamw", lr=0.003, weight_decay=0.0, batch_size=8, epochs=1)
    )
    train.validate()
    for bad in (dict(sigma=0.0), dict(loss=PoseLossWeights(coords=-1.0))):
        with pytest.raises(ParamsError, match="sigma > 0 and loss weights"):
            dataclasses.replace(train, **bad).validate()


def test_augmented_crops_keep_labels_on_the_body(pose_pairs):
    root, _ = pose_pairs
    split = load_split(root / "pose", "ntu120_xsub", "train")
    dataset = CropDataset(split, AugmentParams(), seed=3)
    image, uv, xyz, vis, other = dataset[0]
    assert image.shape == (64, 64, 3) and image.dtype == torch.uint8
    assert uv.shape == (25, 2) and xyz.shape == (25, 3) and vis.shape == (25,) and other.shape == (4,)
    assert torch.all(xyz[SPINE_MIDDLE] == 0)
    # bone lengths are preserved by the 3D rotation / flip
    bone = np.linalg.norm(split.joints3d[0, 3] - split.joints3d[0, 2])
    np.testing.assert_allclose(np.linalg.norm(xyz[3] - xyz[2]), bone, rtol=1e-5)


def test_each_crop_knows_the_other_person_of_its_frame(pose_pairs):
    root, _ = pose_pairs
    split = load_split(root / "pose", "ntu120_xsub", "train")
    group = zarr.open_group(str(root / "pose" / "pose.zarr"), mode="r")
    rows = np.flatnonzero(np.isin(group["crop_video"][:], split.crop_video))  # load_split's rows (no subset)
    key = list(zip(split.crop_video.tolist(), group["crop_frame"][:][rows].tolist(), strict=True))
    paired = np.isfinite(split.other_box).all(1)
    assert paired.any() and (~paired).any()  # the fixture holds one- and two-person frames
    size = split.crops.shape[1]
    for i in np.flatnonzero(paired)[:20]:
        (j,) = [q for q in range(len(key)) if key[q] == key[i] and q != i]  # the peer: same video, frame
        to_video = split.crop_box[j, 2] / size, split.crop_box[j, :2] - split.crop_box[j, 2] / 2
        pts = split.joints2d[j][split.visible[j] > 0] * to_video[0] + to_video[1]  # peer joints, video px
        corner = np.tile(split.crop_box[i, :2] - split.crop_box[i, 2] / 2, 2)
        back = split.other_box[i] * split.crop_box[i, 2] / size + corner
        np.testing.assert_allclose(back, np.concatenate([pts.min(0), pts.max(0)]), atol=1e-2)
    for i in np.flatnonzero(~paired):
        assert sum(k == key[i] for k in key) == 1  # alone in its frame


def test_other_boxes_pair_crops_by_video_and_frame():
    size = 100
    crop_box = np.array([[100, 100, 50], [130, 100, 100], [100, 100, 50], [500, 500, 200]], np.float32)
    joints = np.zeros((4, 25, 2), np.float32)
    joints[:, :, 0], joints[:, :, 1] = np.linspace(20, 80, 25), np.linspace(10, 90, 25)
    valid = np.ones((4, 25), bool)
    valid[1, :5] = False  # only labelled joints make the box
    video, frame = np.array([0, 0, 0, 1]), np.array([7, 7, 8, 7])
    out = other_boxes(video, frame, crop_box, joints, valid, size)
    assert np.isnan(out[2:]).all()  # another frame, another video: alone
    # crop 1 (side 100 at (130, 100), 1 video px per crop px): its joints 5.. in video px
    peer = np.array([80 + 20 + 60 * 5 / 24, 50 + 10 + 80 * 5 / 24, 80 + 80, 50 + 90])
    np.testing.assert_allclose(out[0], (peer - [75, 75, 75, 75]) * 2, atol=1e-3)
    mine = np.array([75 + 10, 75 + 5, 75 + 40, 75 + 45])  # crop 0's joints in video px
    np.testing.assert_allclose(out[1], mine - [80, 50, 80, 50], atol=1e-3)


@pytest.mark.slow
def test_train_pose_runs_reports_and_resumes_exactly(pose_pairs, tmp_path, monkeypatch):
    root, _ = pose_pairs
    torch.set_num_threads(1)
    params = train_pose.TrainPoseParams(
        recipe=Recipe(
            optimizer="adamw", lr=0.003, weight_decay=0.0, batch_size=8, epochs=2, warmup_epochs=0.0
        ),
        frame_batch_size=2,
        max_train_crops=48,
        max_test_crops=24,
        workers=0,
        seed=0,
        flip_test=True,
    )
    out, reports = tmp_path / "model", tmp_path / "reports"
    metrics = train_pose.run(params, pose_dir=root / "pose", out_dir=out, reports_dir=reports)
    assert set(metrics) >= {"pck@0.2", "pck@0.5", "px_error", "mpjpe_mm", "det_recall", "det_precision"}
    assert 0.0 <= metrics["pck@0.2"] <= metrics["pck@0.5"] <= 1.0 and metrics["mpjpe_mm"] > 0
    assert json.loads((reports / "metrics.json").read_text())["epochs"] == 2
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["kind"] == "pose_estimator" and ckpt["epoch"] == 2
    assert train_pose.load_estimator(out / "last.pt").cfg.input_size == (64, 64)

    # killed after epoch 1 (history written after the checkpoint), then resumed
    other = tmp_path / "other"
    calls = []

    def kill_once(path, history):
        calls.append(len(history))
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_pose, "_write_history", kill_once)
    with pytest.raises(KeyboardInterrupt):
        train_pose.run(params, pose_dir=root / "pose", out_dir=other, reports_dir=tmp_path / "r2")
    assert load_checkpoint(other / "last.pt")["epoch"] == 1
    train_pose.run(params, pose_dir=root / "pose", out_dir=other, reports_dir=tmp_path / "r2", resume=True)
    resumed = load_checkpoint(other / "last.pt")["model"]
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_evaluate_video_scores_held_out_videos_both_ways(pose_pairs, tiny_bundle, tmp_path_factory, tmp_path):
    """The untrained pose export (its detector always fires) through the video path, beside the files."""
    from stages import evaluate_video
    from tests.pose_helpers import pose_export

    root, _ = pose_pairs
    pose_dir = pose_export(tmp_path_factory).dir
    params = evaluate_video.EvaluateVideoParams(videos_per_class=1, threads=1)
    metrics = evaluate_video.run(params, video_dir=root / "rgb", skeleton_dir=root / "raw", pose_dir=pose_dir,
                                 bundle_dir=tiny_bundle.bundle_dir, out_dir=tmp_path / "a")  # fmt: skip
    rows = (tmp_path / "a" / "per_video.csv").read_text().splitlines()
    assert metrics["videos"] == len(rows) - 1 == 2  # one held-out video per class (8 and 50)
    assert all(r.split(",")[1] in ("8", "50") for r in rows[1:])
    assert 0.0 <= metrics["video_top1"] <= 1.0 and 0.0 <= metrics["skeleton_top1"] <= 1.0
    assert 0.0 <= metrics["pck@0.2"] <= metrics["pck@0.5"] <= 1.0 and metrics["frames"] > 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["videos"] == 2
    # only training performers' videos: nothing to measure, reported as such rather than failing
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for video in (root / "rgb").glob("*_rgb.avi"):
        if int(video.name[9:12]) in NTU120_XSUB_TRAIN_SUBJECTS:
            shutil.copy(video, train_only / video.name)
    empty = evaluate_video.run(params, video_dir=train_only, skeleton_dir=root / "raw", pose_dir=pose_dir,
                               bundle_dir=tiny_bundle.bundle_dir, out_dir=tmp_path / "b")  # fmt: skip
    assert empty["videos"] == 0 and empty["video_top1"] == 0.0


def test_pairs_find_a_skeleton_whose_extension_is_upper_case(tmp_path):
    videos, skeletons = tmp_path / "rgb", tmp_path / "raw"
    videos.mkdir(), skeletons.mkdir()
    for name in ("S001C001P001R001A008", "S001C001P001R001A009", "S001C001P001R001A010"):
        (videos / f"{name}_rgb.avi").write_bytes(b"RIFF")
    (skeletons / "S001C001P001R001A008.SKELETON").write_bytes(b"1")
    (skeletons / "S001C001P001R001A009.skeleton").write_bytes(b"1")
    pairs = pose_data.discover_pairs(videos, skeletons)
    assert [(p.name, p.skeleton and Path(p.skeleton).name) for p in pairs] == [
        ("S001C001P001R001A008", "S001C001P001R001A008.SKELETON"),
        ("S001C001P001R001A009", "S001C001P001R001A009.skeleton"),
        ("S001C001P001R001A010", None),
    ]
