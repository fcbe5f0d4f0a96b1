"""params.yaml sections: strict keys and types, with messages that name the problem."""

from __future__ import annotations

import pytest

from stages.dataset import LoaderParams
from stages.features import FeaturesParams
from stages.params import ParamsError, from_mapping, load_section
from stages.parse import ParseParams


def test_repository_params_load():
    assert load_section("params.yaml", "parse", ParseParams).max_frames == 300
    assert load_section("params.yaml", "features", FeaturesParams).streams[0] == "joint"
    assert load_section("params.yaml", "loader", LoaderParams).window == 64


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"dataset": "ntu90"}, "must be one of 'synthetic', 'ntu60', 'ntu120'"),
        ({"workers": "two"}, "expected an integer"),
        ({"workers": True}, "expected an integer"),
        ({"classes": [1, 1]}, "ids must be distinct"),
        ({"classes": "some"}, "matches none of the allowed forms"),
        ({"max_frame": 10}, "unknown key(s) max_frame; valid keys are"),
        ({"shard_samples": 100, "chunk_samples": 64}, "multiple of chunk_samples"),
    ],
)
def test_bad_values_fail_loudly(values, phrase):
    with pytest.raises(ParamsError) as info:
        from_mapping("parse", ParseParams, values)
    assert phrase in str(info.value)


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_section(tmp_path / "nope.yaml", "parse", ParseParams)
    (tmp_path / "p.yaml").write_text("features: {}\n")
    with pytest.raises(ParamsError, match="no \\[parse\\] section; sections present: features"):
        load_section(tmp_path / "p.yaml", "parse", ParseParams)


def test_classes_resolve_to_labels():
    assert ParseParams(dataset="ntu60").class_ids() == tuple(range(1, 61))
    assert from_mapping("parse", ParseParams, {"classes": [9, 8]}).class_ids() == (8, 9)
