"""The topology, defined once, against the NTU list (1-based, as published)."""

from __future__ import annotations

import numpy as np

from models import skeleton

NTU_BONES_1BASED = [
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
    (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19),
    (22, 23), (23, 8), (24, 25), (25, 12),
]  # fmt: skip


def test_edges_match_the_ntu_list():
    assert sorted(skeleton.EDGES) == sorted((c - 1, p - 1) for c, p in NTU_BONES_1BASED)
    assert skeleton.PARENTS[skeleton.CENTER_JOINT] == skeleton.CENTER_JOINT
    assert len(skeleton.JOINT_NAMES) == skeleton.NUM_JOINTS == 25


def test_every_joint_reaches_the_centre():
    for joint in range(25):
        seen = set()
        while joint != skeleton.CENTER_JOINT:
            assert joint not in seen
            seen.add(joint)
            joint = skeleton.PARENTS[joint]


def test_adjacency_subsets():
    a = skeleton.adjacency_subsets()
    assert a.shape == (3, 25, 25)
    assert np.array_equal(a[0], np.eye(25))
    inward = a[1] > 0
    assert inward.sum() == 24 and np.array_equal(inward, (a[2] > 0).T)
    assert inward[skeleton.PARENTS[0], 0]  # spine base -> spine middle is inward
    np.testing.assert_allclose(a[1].sum(axis=0)[a[1].sum(axis=0) > 0], 1.0, rtol=1e-6)


def test_flip_index_swaps_left_and_right():
    flip = skeleton.FLIP_INDEX
    assert flip[4] == 8 and flip[8] == 4 and flip[21] == 23 and flip[0] == 0
    assert all(flip[flip[j]] == j for j in range(25))
