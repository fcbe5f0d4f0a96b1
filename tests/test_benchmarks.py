"""The benchmark scripts' command lines: clear messages instead of tracebacks when their inputs are
missing, and the fairness fixes that are cheap to check (no benchmark is run here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import gcn_throughput, inference_latency, loader_throughput, parse_throughput, serve_load

REPO = Path(__file__).resolve().parents[1]


def test_loader_throughput_without_a_store_says_so(tmp_path, capsys):
    assert loader_throughput.main(["--features-dir", str(tmp_path / "none")]) == 2
    assert "run `make run` first" in capsys.readouterr().err


def test_loader_throughput_gives_each_measurement_a_fresh_dataset(tmp_path, monkeypatch, capsys):
    """Forked loader workers inherit the parent's shard cache: no measurement may reuse a dataset."""
    features = tmp_path / "features"
    (features / "features.zarr").mkdir(parents=True)
    (features / "samples.parquet").touch()

    class FakeDataset:
        def __init__(self, path, **kwargs):
            self.kwargs = kwargs

        def __len__(self):
            return 10

    class FakeBaseline(FakeDataset):
        pass

    seen = []

    def fake_measure(dataset, workers, batches, batch_size):
        seen.append((dataset, workers, batches))
        return 100.0

    monkeypatch.setattr(loader_throughput, "SkeletonDataset", FakeDataset)
    monkeypatch.setattr(loader_throughput, "PerSampleReads", FakeBaseline)
    monkeypatch.setattr(loader_throughput, "measure", fake_measure)
    args = ["--features-dir", str(features), "--params", str(REPO / "params.yaml")]
    assert loader_throughput.main([*args, "--batches", "8", "--baseline-batches", "3"]) == 0
    baseline, *loaders = seen
    assert isinstance(baseline[0], FakeBaseline) and baseline[1:] == (0, 3)
    assert [w for _, w, _ in loaders] == [0, 1, 2] and {b for _, _, b in loaders} == {8}
    assert len({id(d) for d, _, _ in loaders}) == 3
    assert "8 batches per measurement (3 for the baseline)" in capsys.readouterr().out


def test_inference_latency_without_the_pipeline_outputs_says_so(tmp_path, capsys):
    args = ["--model", str(tmp_path / "model.pt"), "--bundle", str(tmp_path / "bundle")]
    assert inference_latency.main(args) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "model.onnx" in err and "run `make run` first" in err


def test_serve_load_without_a_bundle_or_clip_says_so(tmp_path, capsys):
    assert serve_load.main(["--bundle", str(tmp_path / "bundle")]) == 2
    assert "no model bundle" in capsys.readouterr().err
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert serve_load.main(["--bundle", str(bundle), "--clip", str(tmp_path / "x.skeleton")]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run `make run` first"):
        serve_load.default_clip(tmp_path / "raw")
    with pytest.raises(SystemExit):
        serve_load.main(["--bundle", str(bundle), "--clients", "1,x"])


def test_gcn_throughput_reports_a_failed_measurement_with_its_stderr(monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback ...\nValueError: boom\n")

    monkeypatch.setattr(gcn_throughput.subprocess, "run", failing)
    with pytest.raises(gcn_throughput.MeasurementFailed, match=r"(?s)ours failed.*ValueError: boom"):
        gcn_throughput.run_one("ours", [])


def test_parse_throughput_warms_the_references_up_too(tmp_path, monkeypatch):
    """Our reader is warmed by the acceptance pass; each reference gets one untimed call as well."""
    templates = parse_throughput.write_templates(tmp_path / "templates", count=2)
    paths = parse_throughput.link_corpus(templates, tmp_path / "files", 3)
    calls: dict[str, int] = {}

    def reader(name):
        return lambda path: calls.__setitem__(name, calls.get(name, 0) + 1)

    monkeypatch.setattr(parse_throughput, "READERS", {"a": reader("a"), "b": reader("b")})
    seconds = parse_throughput.time_readers(paths)
    assert calls == {"a": 4, "b": 4} and set(seconds) == {"a", "b", parse_throughput.OURS}
