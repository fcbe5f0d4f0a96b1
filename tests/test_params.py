"""params.yaml sections: strict keys and types, with messages that name the problem."""

from __future__ import annotations

import os

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
    present = from_mapping("parse", ParseParams, {"classes": "present", "dataset": "ntu60"})
    assert present.class_ids({59, 9, 61, 8}) == (8, 9, 59)  # NTU-60 has actions 1-60 only


def test_usable_cpus_is_capped_by_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    from stages import params as params_module

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's count, inside a container
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(params_module, "_cgroup_cpu_quota", lambda: None)
    assert params_module.usable_cpus() == 4  # taskset / cpuset
    monkeypatch.setattr(params_module, "_cgroup_cpu_quota", lambda: 2.5)
    assert params_module.usable_cpus() == 2  # docker --cpus 2.5: 2 threads, not 64
    monkeypatch.setattr(params_module, "_cgroup_cpu_quota", lambda: 0.5)
    assert params_module.usable_cpus() == 1


def test_cgroup_quota_reads_v2_and_v1(tmp_path):
    from stages.params import _cgroup_cpu_quota

    assert _cgroup_cpu_quota(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert _cgroup_cpu_quota(tmp_path) is None


def test_torch_threads_take_omp_num_threads_else_a_share_of_the_cpus(monkeypatch):
    from stages import params as params_module

    monkeypatch.setattr(params_module, "usable_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert params_module.torch_threads() == 8 and params_module.torch_threads(3) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it
    assert params_module.torch_threads(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored
    assert params_module.torch_threads(16) == 1


def test_a_missing_section_is_an_error_unless_its_defaults_are_asked_for(tmp_path):
    from stages.parse import denoise_mode

    path = tmp_path / "params.yaml"
    path.write_text("features:\n  view_align: true\n")
    with pytest.raises(ParamsError, match=r"no \[parse\] section; sections present: features"):
        load_section(path, "parse", ParseParams)
    assert load_section(path, "parse", ParseParams, missing_ok=True) == ParseParams()
    assert denoise_mode(path) == "complete"
    path.write_text("parse:\n  denoise: reference\n")
    assert denoise_mode(path) == "reference"
    path.write_text("parse:\n  denoise: ctrgcn\n")
    with pytest.raises(ParamsError, match="denoise"):
        denoise_mode(path)
