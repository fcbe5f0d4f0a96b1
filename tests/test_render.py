"""Tests of the RGB renderer (``stages/synth/render.py``) and the ``render`` stage (``stages/render.py``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest

from stages import render as render_stage
from stages.ntu_files import NTU120_XSUB_TRAIN_SUBJECTS, parse_name
from stages.params import ParamsError, from_mapping
from stages.render import RenderError, RenderParams, choose_videos, floor_geometry, video_scene
from stages.skeleton_text import parse_skeleton
from stages.synth.camera import project_color
from stages.synth.render import Geometry, make_background, make_look, make_scene, render_frames
from stages.synthesize import SynthesizeParams, corpus_names, generate_sample
from stages.synthesize import run as synthesize

TINY = SynthesizeParams(seed=7, classes=(8, 50), num_subjects=2, num_setups=1, num_sessions=2, workers=1)
SMALL_RENDER = RenderParams(width=128, videos_per_class=2, workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The 24 ``.skeleton`` files of TINY (classes 8 sitting down and 50 punching, 2 performers)."""
    raw = tmp_path_factory.mktemp("render") / "raw"
    synthesize(TINY, out_dir=raw)
    return raw


@pytest.fixture(scope="module")
def rendered(corpus, tmp_path_factory):
    """The render stage run on TINY: ``(out_dir, summary)``."""
    out = tmp_path_factory.mktemp("render") / "rgb"
    return out, render_stage.run(SMALL_RENDER, TINY, raw_dir=corpus, out_dir=out)


def _sample(action: int, camera: int):
    name = next(n for n in corpus_names(TINY) if n.action == action and n.camera == camera)
    return name, generate_sample(name, TINY)


def _labelled_joints(sample):
    """``(frame, actor, colour px (25, 2))`` for every real actor's body record, read from the file."""
    raw = parse_skeleton(sample.data)
    owner = {body: a for a, ids in enumerate(sample.actor_ids) for body in ids}
    for r, (frame, body) in enumerate(zip(raw.frame_index, raw.body_ids, strict=True)):
        if int(body) in owner:  # ghosts and furniture bodies are not drawn
            yield int(frame), owner[int(body)], raw.colors[r], raw.joints[r]


def _pixels(colour_px, scene):
    """Rounded render pixels ``(K, 2)`` of the colour-frame points inside the frame, and that mask."""
    uv = np.round(colour_px * scene.scale).astype(int)
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < scene.width) & (uv[:, 1] >= 0) & (uv[:, 1] < scene.height)
    return uv[inside], inside


# --------------------------------------------------------------------------------------------
# The renderer


def test_same_seeds_same_frames_other_seed_other_background():
    _, sample = _sample(50, 1)
    looks = [make_look(1), make_look(2)]

    def frames(room_seed, light_seed):
        scene = make_scene(160, room_seed=room_seed, light_seed=light_seed)
        return scene, np.stack(list(render_frames(sample.actor_xyz, sample.actor_present, scene, looks)))

    scene, first = frames(3, 4)
    again = frames(3, 4)[1]
    other_room, other_room_frames = frames(5, 4)
    assert first.shape == (sample.actor_xyz.shape[1], 90, 160, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert np.abs(scene.background.astype(int) - other_room.background).mean() > 10
    assert not np.array_equal(first, other_room_frames)
    assert not np.array_equal(make_background(3, 160), make_background(4, 160))
    # the sensor noise changes from frame to frame (frames without a body still differ)
    assert not np.array_equal(first[0], first[1])


def test_every_label_lands_on_a_drawn_body_and_on_its_own_unless_occluded():
    for action, camera in ((8, 1), (8, 3), (50, 1), (50, 2), (50, 3)):
        name, sample = _sample(action, camera)
        scene = make_scene(320, room_seed=1, light_seed=2, geometry=floor_geometry(TINY.seed, name))
        labels = [m for _, m in render_frames(sample.actor_xyz, sample.actor_present, scene,
                                              [make_look(3), make_look(4)], with_masks=True)]  # fmt: skip
        counts = {"in_frame": 0, "on_body": 0, "near_own": 0, "near_total": 0}
        for frame, actor, colour_px, xyz in _labelled_joints(sample):
            uv, inside = _pixels(colour_px, scene)
            hit = labels[frame][uv[:, 1], uv[:, 0]]
            counts["in_frame"] += len(hit)
            counts["on_body"] += int((hit > 0).sum())
            other = 1 - actor
            if sample.actor_xyz.shape[0] == 1 or not sample.actor_present[other, frame]:
                assert (hit == actor + 1).all(), f"{name.name} frame {frame}: a lone body's joint off it"
                continue
            # A joint on the other performer's pixels is behind (a part of) that performer.
            hidden = hit == other + 1
            nearest_other = sample.actor_xyz[other, frame, :, 2].min()
            assert (xyz[inside][hidden, 2] > nearest_other - 0.15).all(), f"{name.name} frame {frame}"
            if xyz[:, 2].mean() < sample.actor_xyz[other, frame, :, 2].mean():  # the nearer performer
                counts["near_own"] += int((hit == actor + 1).sum())
                counts["near_total"] += len(hit)
        assert counts["in_frame"] > 500, name.name
        assert counts["on_body"] == counts["in_frame"], f"{name.name}: {counts}"
        if counts["near_total"]:
            assert counts["near_own"] >= 0.95 * counts["near_total"], f"{name.name}: {counts}"


def test_frames_without_bodies_are_the_background_with_noise():
    _, sample = _sample(8, 2)
    present = np.zeros_like(sample.actor_present)
    scene = make_scene(160, room_seed=1, light_seed=2, noise_sd=3.0)
    frame, labels = next(render_frames(sample.actor_xyz, present, scene, [make_look(0)], with_masks=True))
    diff = frame.astype(float) - scene.background
    assert not labels.any()
    assert 2.0 < diff.std() < 4.0 and abs(diff.mean()) < 0.5


def test_nearer_performer_occludes_the_farther_one():
    _, sample = _sample(8, 1)
    xyz = sample.actor_xyz[:, :1]
    near = xyz.copy()
    near[..., 2] -= 0.8  # the same pose, 0.8 m nearer, so it covers the first one's middle
    both = np.concatenate([xyz, near])
    scene = make_scene(320, room_seed=1, light_seed=2)
    for order in ((0, 1), (1, 0)):  # the drawing order follows depth, not the actor index
        _, labels = next(render_frames(both[list(order)], np.ones((2, 1), bool), scene,
                                       [make_look(1), make_look(2)], with_masks=True))  # fmt: skip
        uv, _ = _pixels(project_color(both[1, 0]), scene)
        assert len(uv) > 20 and (labels[uv[:, 1], uv[:, 0]] == order.index(1) + 1).all()


def test_render_checks_its_inputs():
    scene = make_scene(64, room_seed=0, light_seed=0)
    with pytest.raises(ValueError, match=r"expected \(A, F, 25, 3\)"):
        render_frames(np.zeros((1, 3, 24, 3)), np.ones((1, 3), bool), scene, [make_look(0)])
    with pytest.raises(ValueError, match="1 looks for 2 actors"):
        render_frames(np.zeros((2, 3, 25, 3)), np.ones((2, 3), bool), scene, [make_look(0)])


def test_floor_geometry_puts_the_feet_on_the_floor():
    name, sample = _sample(8, 3)
    geometry = floor_geometry(TINY.seed, name)
    assert isinstance(geometry, Geometry)
    normal = np.asarray(geometry.normal)
    feet = sample.clean_xyz[0, sample.actor_present[0]][:, [15, 19]]
    heights = feet @ normal - geometry.offset
    assert np.isclose(np.linalg.norm(normal), 1.0) and 0.6 < -geometry.offset < 1.7
    assert heights.min() > -0.01 and np.median(heights.min(axis=1)) < 0.08


# --------------------------------------------------------------------------------------------
# The stage


def test_choose_videos_is_balanced_and_deterministic():
    names = corpus_names(dataclasses.replace(TINY, num_subjects=4, num_setups=2, num_sessions=4))
    chosen = choose_videos(names, 12, seed=0)
    assert chosen == choose_videos(names, 12, seed=0) and chosen == sorted(chosen, key=lambda n: n.name)
    for action in (8, 50):
        picks = [n for n in chosen if n.action == action]
        assert len(picks) == 12
        assert sorted(np.bincount([n.camera for n in picks])[1:]) == [4, 4, 4]
        assert sum(n.performer in NTU120_XSUB_TRAIN_SUBJECTS for n in picks) == 6
        assert np.bincount([n.performer for n in picks]).max() == 3  # 4 performers, 3 each
    assert choose_videos(names, 0, seed=0) == sorted(names, key=lambda n: n.name)
    assert choose_videos(names, 12, seed=1) != chosen


def test_stage_writes_decodable_videos_that_match_the_labels(corpus, rendered):
    out, summary = rendered
    manifest = json.loads((out / "render.json").read_text())
    assert summary["num_videos"] == 4 and summary["num_rejected"] == 0
    assert manifest["width"] == 128 and manifest["height"] == 72 and manifest["scale"] == 128 / 1920
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{v['name']}_rgb.avi" for v in manifest["videos"]] + ["render.json"]
    )
    for video in manifest["videos"]:
        name = parse_name(video["name"])
        sample = generate_sample(name, TINY)
        raw = parse_skeleton((corpus / f"{video['name']}.skeleton").read_bytes())
        assert video["status"] == "rendered" and video["frames"] == raw.declared_frames
        assert video["actors"] == (2 if name.action == 50 else 1)
        capture = cv2.VideoCapture(str(out / f"{video['name']}_rgb.avi"))
        decoded = []
        while (frame := capture.read())[0]:
            decoded.append(frame[1])
        capture.release()
        assert len(decoded) == raw.declared_frames
        assert decoded[0].shape == (72, 128, 3)
        scene, looks = video_scene(name, SMALL_RENDER, TINY)
        drawn = render_frames(sample.actor_xyz, sample.actor_present, scene, looks[: video["actors"]])
        differences = []
        for i, frame in enumerate(drawn):  # frame i of the video is frame i of the file
            assert np.abs(decoded[i].astype(int) - frame).mean() < 6, (video["name"], i)
        for f, _, colour_px, _ in _labelled_joints(sample):
            uv, _ = _pixels(colour_px, scene)
            seen = decoded[f][uv[:, 1], uv[:, 0]].astype(int) - scene.background[uv[:, 1], uv[:, 0]]
            differences += np.abs(seen).sum(-1).tolist()
        assert np.median(differences) > 30, video["name"]


def test_stage_output_does_not_depend_on_workers(corpus, rendered, tmp_path):
    out, _ = rendered
    render_stage.run(
        dataclasses.replace(SMALL_RENDER, workers=2), TINY, raw_dir=corpus, out_dir=tmp_path / "two"
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_mismatched_skeleton_is_rejected_and_the_rest_rendered(corpus, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = ["S001C001P001R001A008", "S001C002P001R001A050", "S001C003P003R002A050"]
    for n in names:
        shutil.copy(corpus / f"{n}.skeleton", raw)
    edited = raw / f"{names[1]}.skeleton"
    data = edited.read_bytes()
    edited.write_bytes(data[:200] + (b"9" if data[200:201] != b"9" else b"8") + data[201:])
    (raw / "corpus.json").write_text("{}")  # other files are ignored
    params = dataclasses.replace(SMALL_RENDER, width=64, videos_per_class=0)
    summary = render_stage.run(params, TINY, raw_dir=raw, out_dir=tmp_path / "rgb")
    rows = {r["name"]: r for r in json.loads((tmp_path / "rgb" / "render.json").read_text())["videos"]}
    assert summary["num_videos"] == 2 and summary["num_rejected"] == 1
    assert rows[names[1]]["status"] == "rejected" and rows[names[1]]["frames"] == 0
    assert "first difference at byte 200" in rows[names[1]]["reason"]
    assert "other synthesize params" in rows[names[1]]["reason"]
    assert not (tmp_path / "rgb" / f"{names[1]}_rgb.avi").exists()
    for n in (names[0], names[2]):
        assert rows[n]["status"] == "rendered" and rows[n]["reason"] is None
        assert (tmp_path / "rgb" / f"{n}_rgb.avi").stat().st_size > 1000
    # a corpus made with another seed is rejected file by file, with the same reason
    other = render_stage.run(params, dataclasses.replace(TINY, seed=8), raw_dir=raw, out_dir=tmp_path / "x")
    assert other["num_videos"] == 0 and other["num_rejected"] == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"width": 650}, r"\[render\] width = 650: need a multiple of 16"),
        ({"width": 32}, r"width = 32"),
        ({"codec": "H264"}, r"codec = 'H264': must be one of MJPG, XVID, FFV1"),
        ({"fps": 0}, r"fps = 0"),
        ({"noise_sd": -1.0}, r"noise_sd = -1.0"),
        ({"videos_per_class": -2}, r"videos_per_class = -2"),
        ({"workers": -1}, r"workers = -1"),
        ({"widht": 640}, r"unknown key\(s\) widht"),
        ({"fps": "30"}, r"\[render\] fps = '30': expected an integer"),
    ],
)
def test_params_errors_name_the_key(values, message):
    with pytest.raises(ParamsError, match=message):
        from_mapping("render", RenderParams, values)


def test_missing_corpus_and_unwritable_codec_are_clear_errors(corpus, tmp_path, monkeypatch):
    with pytest.raises(RenderError, match="run the synthesize stage first"):
        render_stage.run(SMALL_RENDER, TINY, raw_dir=tmp_path / "nowhere", out_dir=tmp_path / "rgb")

    class Closed:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

    monkeypatch.setattr(render_stage.cv2, "VideoWriter", Closed)
    with pytest.raises(RenderError, match=r"could not open .*codec MJPG"):
        render_stage.run(SMALL_RENDER, TINY, raw_dir=corpus, out_dir=tmp_path / "rgb")
    assert not (tmp_path / "rgb").exists()  # nothing half-written


def test_main_reads_both_sections_and_prints_one_json_line(corpus, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(corpus / "S001C001P001R001A008.skeleton", raw)
    synth = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(TINY).items()}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"synthesize": synth, "render": {"width": 64, "workers": 1}}))
    argv = ["--params", str(params), "--raw-dir", str(raw), "--out-dir", str(tmp_path / "o")]
    assert render_stage.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_videos"] == 1 and printed["width"] == 64 and printed["height"] == 36
    params.write_text(json.dumps({"synthesize": synth, "render": {"codec": "h264"}}))
    assert render_stage.main(argv) == 2
    assert "render: error: params.yaml [render] codec = 'h264'" in capsys.readouterr().err
