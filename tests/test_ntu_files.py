"""Names, official splits and missing lists, checked against the published facts."""

from __future__ import annotations

import pytest

from stages import ntu_files
from stages.ntu_files import SampleName, parse_name, split_membership


def test_parse_name_fields():
    assert parse_name("S001C002P003R002A013") == SampleName(1, 2, 3, 2, 13)
    assert SampleName(18, 3, 106, 1, 120).name == "S018C003P106R001A120"


@pytest.mark.parametrize(
    ("stem", "phrase"),
    [
        ("S001C002P003R002A013_rgb", "does not match"),
        ("s001c002p003r002a013", "does not match"),
        ("S001C004P003R002A013", "camera 4"),
        ("S001C001P003R003A013", "replication 3"),
        ("S001C001P003R001A121", "action 121"),
        ("S000C001P003R001A001", "start at 1"),
        ("S001C002P003R002A013\n", "does not match"),  # a name ends at its last digit
        ("S\u0661\u0660\u0661C002P003R002A013", "does not match"),  # Arabic-Indic digits: not a setup
    ],
)
def test_bad_names_say_what_is_wrong(stem, phrase):
    with pytest.raises(ValueError, match=phrase):
        parse_name(stem)


def test_ntu120_xsub_has_53_of_106_training_subjects():
    train = [
        p for p in range(1, 107) if split_membership(SampleName(1, 1, p, 1, 1))["ntu120_xsub"] == "train"
    ]
    assert len(train) == 53
    assert train[:8] == [1, 2, 4, 5, 8, 9, 13, 14] and train[-3:] == [98, 100, 103]


def test_ntu60_splits_and_membership():
    s = split_membership(SampleName(17, 1, 3, 1, 60))
    assert s == {"ntu60_xsub": "test", "ntu60_xview": "test", "ntu120_xsub": "test", "ntu120_xset": "test"}
    s = split_membership(SampleName(2, 2, 1, 1, 1))
    assert s == {
        "ntu60_xsub": "train",
        "ntu60_xview": "train",
        "ntu120_xsub": "train",
        "ntu120_xset": "train",
    }
    # Setup 18 and action 61 are NTU-120 only: no NTU-60 membership.
    assert split_membership(SampleName(18, 2, 1, 1, 1))["ntu60_xsub"] is None
    assert split_membership(SampleName(1, 2, 1, 1, 61))["ntu60_xview"] is None
    assert [split_membership(SampleName(1, c, 1, 1, 1))["ntu60_xview"] for c in (1, 2, 3)] == [
        "test",
        "train",
        "train",
    ]


def test_xset_even_setups_train():
    assert [split_membership(SampleName(s, 1, 1, 1, 1))["ntu120_xset"] for s in (1, 2, 31, 32)] == [
        "test", "train", "test", "train",
    ]  # fmt: skip


def test_missing_lists_are_the_official_ones():
    m60, m120 = ntu_files.missing_samples("ntu60"), ntu_files.missing_samples("ntu120")
    assert (len(m60), len(m120)) == (302, 535)
    assert m60 <= m120
    assert "S001C002P005R002A008" in m60
    with pytest.raises(ValueError, match="valid: ntu60, ntu120"):
        ntu_files.missing_samples("kinetics")


def test_class_names_cover_120_actions():
    names = ntu_files.class_names()
    assert len(names) == 120
    assert names[8] == "sitting down" and names[9].startswith("standing up")
    assert set(range(50, 61)) | set(range(106, 121)) == ntu_files.MUTUAL_ACTIONS
