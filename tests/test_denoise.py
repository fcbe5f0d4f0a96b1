"""The standard NTU body selection, rule by rule, on crafted files."""

from __future__ import annotations

import numpy as np
import pytest

from stages.denoise import DenoiseError, actor_records, select_actors
from stages.skeleton_text import format_skeleton, parse_skeleton
from tests.factory import FLAT, STANDING, as_written, body, moving, second_person_id_switch

A, B, C, D = 72057594037931101, 72057594037931102, 72057594037931103, 72057594037931104


def select(frames):
    return select_actors(parse_skeleton(format_skeleton(frames)))


def track(template, frames, amplitude, seed):
    return moving(template, frames, amplitude, seed)


def test_single_body_kept_whole_even_if_short():
    xyz = track(STANDING, 5, 0.05, 0)
    result = select([[body(A, x)] for x in xyz])
    assert result.joints.shape == (3, 5, 25, 2)
    assert np.array_equal(result.joints[:, :, :, 0], as_written(xyz).transpose(2, 0, 1))
    assert not result.joints[:, :, :, 1].any()
    assert (result.bodies_seen, result.actors_kept) == (1, 1)


def test_empty_frames_are_dropped():
    xyz = track(STANDING, 30, 0.05, 0)
    frames = [[]] * 3 + [[body(A, x)] for x in xyz[:10]] + [[]] + [[body(A, x)] for x in xyz[10:]] + [[]] * 2
    result = select(frames)
    assert result.joints.shape[1] == 30
    assert np.array_equal(result.joints[:, 10, :, 0], as_written(xyz[10]).T)


def test_short_noise_body_removed_by_length_rule():
    person = track(STANDING, 40, 0.1, 0)
    noise = track(STANDING + np.array([1.5, 0, 1.0]), 11, 0.5, 1)  # 11 frames: noise, despite motion
    frames = [[body(A, person[t])] + ([body(B, noise[t - 5])] if 5 <= t < 16 else []) for t in range(40)]
    result = select(frames)
    assert result.dropped_by_length == 1
    assert result.actors_kept == 1
    assert np.array_equal(result.joints[:, :, :, 0], as_written(person).transpose(2, 0, 1))


def test_flat_body_removed_by_spread_rule_even_with_more_motion():
    person = track(STANDING, 40, 0.02, 0)
    furniture = track(FLAT, 40, 0.3, 1)  # moves more, but wider than tall in every frame
    result = select([[body(B, furniture[t]), body(A, person[t])] for t in range(40)])
    assert result.dropped_by_spread == 1
    assert result.actors_kept == 1
    assert np.array_equal(result.joints[:, :, :, 0], as_written(person).transpose(2, 0, 1))


def test_actor_one_is_the_body_with_most_motion():
    calm = track(STANDING, 30, 0.01, 0)
    lively = track(STANDING + np.array([1.0, 0, 0.3]), 30, 0.2, 1)
    result = select([[body(A, calm[t]), body(B, lively[t])] for t in range(30)])
    assert result.actors_kept == 2
    assert np.array_equal(result.joints[:, :, :, 0], as_written(lively).transpose(2, 0, 1))
    assert np.array_equal(result.joints[:, :, :, 1], as_written(calm).transpose(2, 0, 1))


def test_changed_body_id_joins_actor_one():
    # One person whose Kinect id changes at frame 20 (no overlap), and a calmer second person.
    person = track(STANDING, 40, 0.2, 0)
    other = track(STANDING + np.array([1.0, 0, 0.3]), 40, 0.01, 1)
    frames = [[body(A if t < 20 else C, person[t]), body(B, other[t])] for t in range(40)]
    result = select(frames)
    assert result.bodies_seen == 3 and result.actors_kept == 2
    assert np.array_equal(result.joints[:, :, :, 0], as_written(person).transpose(2, 0, 1))
    assert np.array_equal(result.joints[:, :, :, 1], as_written(other).transpose(2, 0, 1))


def test_second_person_keeps_both_halves_of_a_changed_id():
    # The reference's virtual [0, 0] start for actor 2 would discard the first half (frames 0-19).
    lively = track(STANDING, 40, 0.3, 0)
    calm = track(STANDING + np.array([1.0, 0, 0.3]), 40, 0.05, 1)
    frames = [[body(A, lively[t]), body(B if t < 20 else C, calm[t])] for t in range(40)]
    result = select(frames)
    assert (result.bodies_seen, result.actors_kept, result.dropped_by_overlap) == (3, 2, 0)
    assert np.array_equal(result.joints[:, :, :, 1], as_written(calm).transpose(2, 0, 1))


def test_body_overlapping_both_actors_is_discarded():
    one = track(STANDING, 40, 0.3, 0)
    two = track(STANDING + np.array([1.0, 0, 0]), 40, 0.2, 1)
    third = track(STANDING + np.array([-1.0, 0, 0]), 20, 0.01, 2)  # overlaps both, least motion
    frames = [
        [body(A, one[t]), body(B, two[t])] + ([body(C, third[t - 10])] if 10 <= t < 30 else [])
        for t in range(40)
    ]
    result = select(frames)
    assert result.dropped_by_overlap == 1
    assert np.array_equal(result.joints[:, :, :, 1], as_written(two).transpose(2, 0, 1))


def test_frames_with_both_actors_empty_are_dropped():
    # Actor 1 in frames 0-19, a second long body (less motion) in 25-39 joins actor 1 (no overlap);
    # a third short-lived body in 20-24 is noise, so frames 20-24 end up empty and are dropped.
    first = track(STANDING, 20, 0.3, 0)
    later = track(STANDING, 15, 0.02, 1)
    blip = track(STANDING, 5, 0.02, 2)
    frames = (
        [[body(A, first[t])] for t in range(20)]
        + [[body(D, x)] for x in blip]
        + [[body(B, x)] for x in later]
    )
    result = select(frames)
    assert result.dropped_by_length == 1
    assert result.joints.shape[1] == 35
    assert np.array_equal(result.joints[:, 20:, :, 0], as_written(later).transpose(2, 0, 1))


@pytest.mark.parametrize("other", [False, True])
def test_a_body_id_twice_in_one_frame_is_rejected(other):
    xyz = track(STANDING, 20, 0.1, 0)
    frames = [[body(A, x)] + ([body(B, x + 1.0)] if other else []) for x in xyz]
    frames[5].append(body(A, xyz[5] + 0.5))
    with pytest.raises(DenoiseError, match="bodyID 72057594037931101 appears twice in frame 6") as info:
        select(frames)
    assert info.value.code == "duplicate_body_id"


def test_no_body_at_all_is_rejected():
    with pytest.raises(DenoiseError, match="no body in any of the 3 frames") as info:
        select([[], [], []])
    assert info.value.code == "no_body"


def test_only_noise_bodies_is_rejected():
    short = track(STANDING, 8, 0.1, 0)
    with pytest.raises(DenoiseError, match="none is seen in more than 11 frames") as info:
        select([[body(A, short[t]), body(B, short[t] + 0.5)] for t in range(8)])
    assert info.value.code == "denoised_away"


def random_multi_body_file(rng: np.random.Generator) -> bytes:
    """2-5 bodies with random intervals and shapes (some flat, some short): every rule fires."""
    frames = int(rng.integers(15, 60))
    spans = [sorted(rng.integers(0, frames, size=2).tolist()) for _ in range(int(rng.integers(2, 6)))]
    scales = rng.uniform(0.2, 2.0, size=(len(spans), 2))
    out = []
    for t in range(frames):
        bodies = []
        for b, (start, end) in enumerate(spans):
            if start <= t <= end:
                xyz = rng.normal(size=(25, 3)) * 0.3 * np.array([*scales[b], 1.0]) + np.array([0, 0, 3.0])
                bodies.append(body(A + b, xyz))
        out.append(bodies)
    return format_skeleton(out)


def test_matches_the_ctrgcn_reference_on_random_files():
    from tests.reference_ctrgcn import prepare

    rng = np.random.default_rng(7)
    outcomes = {"same": 0, "rejected": 0, "actor2_differs": 0}
    for _ in range(300):
        data = random_multi_body_file(rng)
        try:
            chosen = select_actors(parse_skeleton(data))
            got = chosen.joints.transpose(1, 3, 2, 0).reshape(chosen.joints.shape[1], 150)  # T, (M V C)
        except DenoiseError:
            got = None
        expected = prepare(data.decode(), actor2_virtual_start=False)
        assert (got is None) == (expected is None)
        if got is None:
            outcomes["rejected"] += 1
            continue
        assert np.array_equal(got, expected)
        outcomes["same"] += 1
        original = prepare(data.decode(), actor2_virtual_start=True)
        outcomes["actor2_differs"] += not np.array_equal(got, original)
        exact = select_actors(parse_skeleton(data), "reference").joints  # the reference, frame for frame
        assert np.array_equal(exact.transpose(1, 3, 2, 0).reshape(exact.shape[1], 150), original)
    assert outcomes["same"] > 200 and outcomes["rejected"] > 0
    assert 0 < outcomes["actor2_differs"] < 0.2 * outcomes["same"]  # the documented deviation, rarely


def test_a_second_person_whose_id_changes_keeps_both_halves_unless_reference():
    """The one difference from CTR-GCN's preparation, and ``denoise="reference"`` removing it."""
    raw = parse_skeleton(second_person_id_switch(40))
    complete, reference = select_actors(raw), select_actors(raw, "reference")
    frames_of_person_2 = [int(s.joints[..., 1].any(axis=(0, 2)).sum()) for s in (complete, reference)]
    assert frames_of_person_2 == [40, 20]
    assert (complete.dropped_by_overlap, reference.dropped_by_overlap) == (0, 1)
    assert np.array_equal(complete.joints[:, 20:], reference.joints[:, 20:])  # the later half: same
    assert np.array_equal(complete.joints[..., 0], reference.joints[..., 0])  # person 1: same
    with pytest.raises(ValueError, match="denoise must be one of"):
        select_actors(raw, "ctrgcn")


def test_actor_records_are_the_bodies_select_actors_places():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(100):
        raw = parse_skeleton(random_multi_body_file(rng))
        try:
            chosen = select_actors(raw)
        except DenoiseError:
            with pytest.raises(DenoiseError):
                actor_records(raw)
            continue
        records = actor_records(raw)
        assert len(records) == 2 and not set(records[0].tolist()) & set(records[1].tolist())
        for actor in range(2):
            placed = chosen.joints[..., actor].transpose(1, 2, 0)  # T, 25, 3
            placed = placed[placed.any(axis=(1, 2))]  # the actor's frames, in order
            np.testing.assert_array_equal(placed, raw.joints[np.sort(records[actor])])
        checked += 1
    assert checked > 50


def test_true_spans_keep_a_body_that_comes_back_apart_from_a_third():
    """A tracked person missed for 20 frames keeps its id (frames 0-29 and 50-99) while a second
    person is seen throughout; a third, short-lived box (frames 85-99) overlaps both. The reference's
    contiguous interval ends the first body at frame 79, so the third box "continues" actor 1 and
    shares its frames; with true spans it overlaps both actors and is dropped."""
    lively = track(STANDING, 100, 0.3, 0)
    second = track(STANDING + np.array([1.0, 0, 0]), 100, 0.1, 1)
    stray = track(STANDING + np.array([-1.0, 0, 0]), 100, 0.02, 2)
    frames = [
        ([body(A, lively[t])] if t < 30 or t >= 50 else [])
        + [body(B, second[t])]
        + ([body(C, stray[t])] if t >= 85 else [])
        for t in range(100)
    ]
    raw = parse_skeleton(format_skeleton(frames))
    ids = raw.body_ids
    reference = actor_records(raw)
    assert set(ids[reference[0]].tolist()) == {A, C}  # C's frames 85-99 clash with A's in actor 1
    assert np.array_equal(ids[reference[1]], np.full(100, B, np.uint64))
    spans = actor_records(raw, true_spans=True)
    assert np.array_equal(spans[0], np.flatnonzero(ids == A))
    assert np.array_equal(spans[1], np.flatnonzero(ids == B))
