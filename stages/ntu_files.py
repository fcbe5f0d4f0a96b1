"""NTU RGB+D naming, class names, official splits and missing-sample lists.

The split rules are the official ones (see the project's NTU notes): NTU-60 cross-subject and
cross-view, NTU-120 cross-subject and cross-setup, all decided by the file name alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

# ASCII digits only, the whole name (``\d`` takes any Unicode digit, ``$`` a trailing newline)
NAME_PATTERN = re.compile(r"S([0-9]{3})C([0-9]{3})P([0-9]{3})R([0-9]{3})A([0-9]{3})")

NTU60_XSUB_TRAIN_SUBJECTS = frozenset(
    (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
)
NTU60_XVIEW_TRAIN_CAMERAS = frozenset((2, 3))
NTU120_XSUB_TRAIN_SUBJECTS = NTU60_XSUB_TRAIN_SUBJECTS | frozenset(
    (45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89,
     91, 92, 93, 94, 95, 97, 98, 100, 103)
)  # fmt: skip

NTU60_MAX_SETUP = 17
NTU60_MAX_ACTION = 60
NTU120_MAX_ACTION = 120
# Classes 50-60 and 106-120 are the two-person (mutual) actions.
MUTUAL_ACTIONS = frozenset(range(50, 61)) | frozenset(range(106, 121))

BENCHMARKS = ("ntu60_xsub", "ntu60_xview", "ntu120_xsub", "ntu120_xset")


@dataclass(frozen=True)
class SampleName:
    """The fields of ``SsssCcccPpppRrrrAaaa`` (all 1-based as in the file name)."""

    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @property
    def name(self) -> str:
        return (
            f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}"
            f"R{self.replication:03d}A{self.action:03d}"
        )


def parse_name(stem: str) -> SampleName:
    """Parse a sample name such as ``S001C002P003R002A013`` (no extension).

    Raises ``ValueError`` saying what is wrong when the name does not follow the NTU pattern.
    """
    match = NAME_PATTERN.fullmatch(stem)
    if match is None:
        raise ValueError(f"name {stem!r} does not match the NTU pattern SsssCcccPpppRrrrAaaa")
    setup, camera, performer, replication, action = (int(g) for g in match.groups())
    if not 1 <= camera <= 3:
        raise ValueError(f"name {stem!r}: camera {camera} is not 1, 2 or 3")
    if not 1 <= replication <= 2:
        raise ValueError(f"name {stem!r}: replication {replication} is not 1 or 2")
    if not 1 <= action <= NTU120_MAX_ACTION:
        raise ValueError(f"name {stem!r}: action {action} is outside 1-{NTU120_MAX_ACTION}")
    if setup < 1 or performer < 1:
        raise ValueError(f"name {stem!r}: setup and performer ids start at 1")
    return SampleName(setup, camera, performer, replication, action)


def is_ntu60(sample: SampleName) -> bool:
    """Whether the sample belongs to NTU RGB+D (60): setups 1-17 and actions 1-60."""
    return sample.setup <= NTU60_MAX_SETUP and sample.action <= NTU60_MAX_ACTION


def split_membership(sample: SampleName) -> dict[str, str | None]:
    """``{benchmark: "train" | "test" | None}`` for the four standard benchmarks.

    ``None`` means the sample is not part of that benchmark (NTU-60 benchmarks hold only NTU-60
    samples).
    """
    in60 = is_ntu60(sample)
    return {
        "ntu60_xsub": (
            ("train" if sample.performer in NTU60_XSUB_TRAIN_SUBJECTS else "test") if in60 else None
        ),
        "ntu60_xview": (
            ("train" if sample.camera in NTU60_XVIEW_TRAIN_CAMERAS else "test") if in60 else None
        ),
        "ntu120_xsub": "train" if sample.performer in NTU120_XSUB_TRAIN_SUBJECTS else "test",
        "ntu120_xset": "train" if sample.setup % 2 == 0 else "test",
    }


def _resource_text(name: str) -> str:
    return resources.files("stages.resources").joinpath(name).read_text(encoding="utf-8")


@cache
def missing_samples(dataset: str) -> frozenset[str]:
    """The dataset authors' official list of samples with missing skeletons (``ntu60``/``ntu120``)."""
    files = {"ntu60": "ntu60_missing_skeletons.txt", "ntu120": "ntu120_missing_skeletons.txt"}
    if dataset not in files:
        raise ValueError(f"no missing-sample list for {dataset!r}; valid: {', '.join(files)}")
    lines = _resource_text(files[dataset]).splitlines()
    return frozenset(line.strip() for line in lines if NAME_PATTERN.fullmatch(line.strip()))


@cache
def class_names() -> dict[int, str]:
    """``{action id (1-based): name}`` for the 120 NTU-120 classes."""
    names = {}
    for line in _resource_text("ntu120_classes.tsv").splitlines()[1:]:
        if line.strip():
            action, name = line.split("\t", 1)
            names[int(action)] = name.strip()
    return names
