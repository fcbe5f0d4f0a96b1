"""Tests of the synthetic NTU corpus (``stages/synthesize.py``, ``stages/synth/``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import numpy as np
import pytest

from stages.ntu_files import MUTUAL_ACTIONS, SampleName, class_names, parse_name, split_membership
from stages.params import ParamsError, from_mapping
from stages.skeleton_text import format_number, parse_skeleton
from stages.synth import camera
from stages.synth.actions import program
from stages.synth.body import FIELD_NAMES, LEAF_JOINTS
from stages.synth.motion import performer_style
from stages.synthesize import SynthesizeParams, corpus_names, generate_sample, run

SMALL = SynthesizeParams(classes=(8, 9, 10, 43, 55), num_subjects=4, num_setups=2, num_sessions=4, workers=1)


def _sample(action: int = 10, camera_id: int = 2, params: SynthesizeParams = SMALL):
    name = next(n for n in corpus_names(params) if n.action == action and n.camera == camera_id)
    return generate_sample(name, params)


def test_same_seed_same_bytes_other_seed_other_bytes():
    name = corpus_names(SMALL)[7]
    first, again = generate_sample(name, SMALL), generate_sample(name, SMALL)
    other = generate_sample(name, dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert first.data == again.data
    assert first.data != other.data


def test_run_is_independent_of_worker_count(tmp_path):
    params = dataclasses.replace(SMALL, classes=(10, 58), num_sessions=1, num_subjects=1)
    run(params, out_dir=tmp_path / "one")
    run(dataclasses.replace(params, workers=2), out_dir=tmp_path / "two")
    files = sorted(p.name for p in (tmp_path / "one").glob("*.skeleton"))
    assert len(files) == 12
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.skeleton"))
    for f in [*files, "corpus.json"]:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_exact_file_format():
    sample = _sample(55)
    text = sample.data.decode("ascii")
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")
    lines = text.split("\r\n")
    assert lines[-1] == "" and int(lines[0]) == len(sample.frames)
    i, body_lines = 1, 0
    for bodies in sample.frames:
        assert int(lines[i]) == len(bodies)
        i += 1
        for _ in bodies:
            head = lines[i].split()
            assert len(head) == 10 and re.fullmatch(r"\d{17}", head[0]) and lines[i + 1] == "25"
            joints = [line.split() for line in lines[i + 2 : i + 27]]
            assert all(len(j) == 12 and j[11] in "012" for j in joints)
            i, body_lines = i + 27, body_lines + 1
    assert i == len(lines) - 1 and body_lines > 0
    assert re.fullmatch(r"S\d{3}C\d{3}P\d{3}R\d{3}A\d{3}", sample.name)
    assert parse_name(sample.name) == next(n for n in corpus_names(SMALL) if n.name == sample.name)


def test_body_ids_are_close_17_digit_integers():
    sample = _sample(55)
    ids = sorted({int(i) for ids in sample.actor_ids for i in ids})
    assert len(ids) >= 2 and all(len(str(i)) == 17 for i in ids)
    assert all(0 < b - a <= 3 * len(ids) for a, b in itertools.pairwise(ids))
    assert float(ids[0]) == float(ids[0] + 1)  # why they must never be read as floats


def test_actor_arrays_round_trip_bit_exactly():
    for action in (10, 55):
        sample = _sample(action)
        parsed = parse_skeleton(sample.data)
        assert sample.actor_xyz.dtype == np.float32 and sample.actor_xyz.shape[1:] == (
            len(sample.frames),
            25,
            3,
        )
        assert sample.actor_xyz.shape[0] == (2 if action in MUTUAL_ACTIONS else 1)
        checked = 0
        for a, ids in enumerate(sample.actor_ids):
            rows = np.flatnonzero(np.isin(parsed.body_ids, np.array(ids, dtype=np.uint64)))
            frames = parsed.frame_index[rows]
            assert np.array_equal(np.flatnonzero(sample.actor_present[a]), np.sort(frames))
            assert np.array_equal(sample.actor_xyz[a, frames], parsed.joints[rows])
            assert np.array_equal(sample.actor_color[a, frames], parsed.colors[rows])
            checked += len(rows)
        absent = ~sample.actor_present
        assert not sample.actor_xyz[absent].any() and checked > 50
        # the values are exactly the written decimal text read as float32
        first = np.flatnonzero(sample.actor_present[0])[0]
        body = next(b for b in sample.frames[first] if b.body_id in sample.actor_ids[0])
        expected = np.float32([float(format_number(v)) for v in body.joints[:, :3].ravel()]).reshape(25, 3)
        assert np.array_equal(sample.actor_xyz[0, first], expected)


def test_pixels_follow_the_intrinsics_and_orientations_are_unit_quaternions():
    sample = _sample(43)
    joints = np.stack([b.joints for bodies in sample.frames for b in bodies])  # (R, 25, 11)
    xyz = joints[..., :3]
    assert np.allclose(joints[..., 3:5], camera.project_depth(xyz), atol=1e-3)
    assert np.allclose(joints[..., 5:7], camera.project_color(xyz), atol=1e-3)
    # the real NTU joint line the constants are calibrated on
    real = np.array([0.2181813, 0.1725006, 3.785027])
    assert np.allclose(camera.project_depth(real), [277.4376, 191.9117], atol=0.6)
    assert np.allclose(camera.project_color(real), [1036.508, 519.1667], atol=0.6)
    quat = joints[..., 7:11]
    inner = [j for j in range(25) if j not in LEAF_JOINTS]
    assert np.allclose(np.linalg.norm(quat[:, inner], axis=-1), 1.0, atol=1e-6)
    assert not quat[:, list(LEAF_JOINTS)].any()
    assert 1.5 < np.median(xyz[..., 2]) < 5.0  # metres in front of the sensor


def test_classes_mutual_and_time_reversal():
    names = corpus_names(SynthesizeParams())
    actions = {n.action for n in names}
    assert len(actions) >= 12 and actions <= set(class_names())
    assert len(actions & MUTUAL_ACTIONS) >= 3 and {8, 9} <= actions
    style = performer_style(np.random.default_rng(0))
    sit = program(8)((style, style), np.random.default_rng(5)).poses[0]
    stand = program(9)((style, style), np.random.default_rng(5)).poses[0]
    for field in FIELD_NAMES:
        assert np.array_equal(getattr(stand, field), getattr(sit, field)[::-1])
    assert sit.l_knee[0] < 0.3 < sit.l_knee[-1]  # sitting ends with bent knees
    with pytest.raises(ValueError, match="implemented"):
        program(1)


def test_performances_are_shared_by_cameras_and_vary_between_performers():
    by_camera = [_sample(43, c) for c in (1, 2, 3)]
    lengths = {len(s.clean_xyz[0]) for s in by_camera}
    assert len(lengths) == 1
    limbs = [np.linalg.norm(s.clean_xyz[0, :, 4] - s.clean_xyz[0, :, 5], axis=-1) for s in by_camera]
    present = [s.actor_present[0] for s in by_camera]
    upper_arm = [np.median(limb[p]) for limb, p in zip(limbs, present, strict=True)]
    assert np.ptp(upper_arm) < 1e-6  # one body, three viewpoints
    assert not np.allclose(by_camera[0].clean_xyz, by_camera[1].clean_xyz)
    other = [n for n in corpus_names(SMALL) if n.action == 43 and n.camera == 1]
    arms = {round(float(np.median(np.linalg.norm(s.clean_xyz[0, s.actor_present[0], 4]
                                                 - s.clean_xyz[0, s.actor_present[0], 5], axis=-1))), 4)
            for s in (generate_sample(n, SMALL) for n in other)}  # fmt: skip
    assert len(arms) >= 3


def test_every_fault_kind_appears_and_noise_bodies_follow_the_denoising_rules():
    params = dataclasses.replace(SMALL, short_noise_rate=0.5, furniture_rate=0.3, id_switch_rate=0.3,
                                 unusable_rate=0.15, empty_frame_rate=0.02)  # fmt: skip
    seen = set()
    for name in corpus_names(params)[::2]:
        sample = generate_sample(name, params)
        seen.update(sample.faults)
        parsed = parse_skeleton(sample.data)
        actor_ids = {i for ids in sample.actor_ids for i in ids}
        for body in set(parsed.body_ids.tolist()) - actor_ids:
            rows = parsed.body_ids == body
            xyz = parsed.joints[rows]
            wide = np.ptp(xyz[..., 0], axis=1) > 0.8 * np.ptp(xyz[..., 1], axis=1)
            assert rows.sum() <= 11 or wide.mean() >= 0.69754
        for ids in sample.actor_ids:  # an id switch: the second id starts after the first ends
            spans = [parsed.frame_index[parsed.body_ids == i] for i in ids]
            assert all(a.max() < b.min() for a, b in itertools.pairwise(spans) if len(a) and len(b))
        if {"unusable_no_bodies", "unusable_noise_only"} & set(sample.faults):
            assert not sample.actor_present.any()
    assert seen >= {"inferred_joints", "untracked_joints", "short_noise_body", "furniture_body", "id_switch",
                    "empty_frames_start", "empty_frames_end", "empty_frames_inside", "unusable_no_bodies",
                    "unusable_noise_only"}  # fmt: skip


def test_real_actors_survive_the_spread_rule_and_lengths_are_plausible():
    lengths = []
    for name in corpus_names(SMALL)[::3]:
        sample = generate_sample(name, SMALL)
        lengths.append(len(sample.frames))
        for a in range(sample.actor_xyz.shape[0]):
            xyz = sample.actor_xyz[a, sample.actor_present[a]]
            if len(xyz):
                wide = np.ptp(xyz[..., 0], axis=1) > 0.8 * np.ptp(xyz[..., 1], axis=1)
                assert wide.mean() < 0.69754, sample.name
    assert min(lengths) >= 30 and max(lengths) <= 300 and 60 <= np.mean(lengths) <= 130


def test_splits_have_train_and_test():
    names = corpus_names(SynthesizeParams())
    assert len(names) == 2400 and len({n.name for n in names}) == 2400
    for benchmark in ("ntu120_xsub", "ntu120_xset", "ntu60_xview"):
        splits = {split_membership(n)[benchmark] for n in names}
        assert splits >= {"train", "test"}, benchmark
    subjects = {n.performer for n in names}
    train = {s for s in subjects if split_membership(SampleName(1, 1, s, 1, 1))["ntu120_xsub"] == "train"}
    assert 20 <= len(subjects) <= 40 and abs(len(train) - len(subjects) / 2) <= 1


def test_run_writes_directory_and_manifest_atomically(tmp_path):
    params = dataclasses.replace(SMALL, classes=(23,), num_sessions=1, num_subjects=1)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.skeleton").write_text("old")
    summary = run(params, out_dir=out)
    files = sorted(p.name for p in out.iterdir())
    assert "stale.skeleton" not in files and "corpus.json" in files and len(files) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary left behind
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["classes"] == {"23": "hand waving"} and manifest["num_samples"] == 6
    assert [s["name"] for s in manifest["samples"]] == [n.name for n in corpus_names(params)]
    assert manifest["params"]["classes"] == [23] and summary["count_by_class"] == {"23": 6}


def test_bad_params_fail_with_a_message():
    with pytest.raises(ParamsError, match="implemented"):
        from_mapping("synthesize", SynthesizeParams, {"classes": [1, 10]})
    with pytest.raises(ParamsError, match="num_sessions"):
        from_mapping("synthesize", SynthesizeParams, {"num_subjects": 2, "num_setups": 2, "num_sessions": 3})
    with pytest.raises(ParamsError, match="unknown key"):
        from_mapping("synthesize", SynthesizeParams, {"sead": 1})
