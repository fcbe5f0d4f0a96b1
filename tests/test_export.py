"""The export stage (ONNX, parity, INT8, TensorRT, bundle) and the shared clip input path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from models.ctrgcn import CTRGCNConfig
from models.inference import InferenceMultiStream
from models.two_stream import MultiStream
from stages import bundle, export, preprocess
from stages.dataset import LoaderParams, SkeletonDataset
from stages.errors import RejectedInput
from stages.features import FeaturesParams
from stages.params import ParamsError, from_mapping
from stages.store import open_store

ROOT = Path(__file__).resolve().parents[1]


# ---- the exported graph ----------------------------------------------------------------------


def test_bundle_holds_a_checked_graph(tiny_bundle):
    report = tiny_bundle.report
    assert report["onnx"]["max_intermediate_rank"] <= 4
    assert "Einsum" not in report["onnx"]["operators"]
    assert report["onnx"]["opset"] >= 17
    path = tiny_bundle.bundle_dir / "model.onnx"
    graph = onnx.load(str(path)).graph
    # the exporter's trace notes (stack traces with this checkout's paths) are stripped: the bytes
    # depend on the weights, not on where the code was
    assert not any(node.metadata_props for node in graph.node)
    # nor its notes on the graph: a shape-range dict printed in string-hash order (per process)
    assert not graph.metadata_props
    assert str(ROOT).encode() not in path.read_bytes() and b"stack_trace" not in path.read_bytes()
    (inp,) = graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "joints" and dims[1:] == [3, dims[2], 25, 2]
    assert isinstance(dims[0], str) and isinstance(dims[2], str)  # batch and T are dynamic
    assert json.loads(tiny_bundle.metrics_path.read_text())["parity"]["top1_agreement"] == 1.0


def _graph(nodes, inputs, outputs, value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_graph_report_rejects_einsum_and_rank5(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    einsum = _graph([helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,kj->ik")], [x], [y])
    onnx.save(einsum, tmp_path / "einsum.onnx")
    with pytest.raises(export.ExportError, match="Einsum"):
        export.graph_report(tmp_path / "einsum.onnx")

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2, 3, 4, 5])
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [2, 3, 4, 5])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3, 4, 5])
    relu = helper.make_node("Relu", ["a"], ["r"])
    reshape = helper.make_node("Reshape", ["r", "shape"], ["b"])
    g = helper.make_graph([relu, reshape], "g", [a], [b], initializer=[shape])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "rank5.onnx")
    with pytest.raises(export.ExportError, match="rank 4"):
        export.graph_report(tmp_path / "rank5.onnx")


def test_onnx_matches_torch_for_any_batch_and_length(tiny_bundle):
    model, _ = export.load_fused(tiny_bundle.model_path)
    session = export.ort_session(tiny_bundle.bundle_dir / "model.onnx")
    rng = np.random.default_rng(0)
    for n, t in ((1, 64), (3, 100), (2, 8)):
        x = rng.normal(0, 0.3, size=(n, 3, t, 25, 2)).astype(np.float32)
        x[..., 1] = 0  # second person absent
        got = export.ort_scores(session, x)
        want = export.torch_scores(model, x)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_four_stream_export_computes_motion_in_the_graph(tmp_path):
    torch.manual_seed(1)
    streams = ("joint", "bone", "joint_motion", "bone_motion")
    two_units = CTRGCNConfig(num_classes=5, channels=(16, 32), strides=(1, 2))  # the graph, not the size
    model = MultiStream(dict.fromkeys(streams, two_units), weights=dict.fromkeys(streams, 0.5))
    model.eval()
    export.export_onnx(InferenceMultiStream(model), tmp_path / "m.onnx")  # what the stage exports
    assert export.graph_report(tmp_path / "m.onnx")["max_intermediate_rank"] <= 4
    x = np.random.default_rng(2).normal(0, 0.3, size=(2, 3, 50, 25, 2)).astype(np.float32)
    np.testing.assert_allclose(
        export.ort_scores(export.ort_session(tmp_path / "m.onnx"), x),
        export.torch_scores(model, x),
        atol=1e-4,
        rtol=1e-4,
    )


def test_one_person_graph_matches_the_full_model_without_a_second_person(tiny_bundle):
    report = tiny_bundle.report["solo"]
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    assert report["max_intermediate_rank"] <= 4 and report["frames"] == 64
    meta = json.loads((tiny_bundle.bundle_dir / "bundle.json").read_text())
    assert meta["files"]["solo"] == "model.solo.onnx"
    assert "model.solo.onnx" in json.loads((tiny_bundle.bundle_dir / "manifest.json").read_text())["files"]
    model, _ = export.load_fused(tiny_bundle.model_path)
    (inp,) = onnx.load(str(tiny_bundle.bundle_dir / "model.solo.onnx")).graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 25, 1]  # dynamic batch, the window's T
    x = np.random.default_rng(3).normal(0, 0.3, size=(5, 3, 64, 25, 2)).astype(np.float32)
    x[..., 1] = 0
    session = export.ort_session(tiny_bundle.bundle_dir / "model.solo.onnx")
    np.testing.assert_allclose(
        export.ort_scores(session, np.ascontiguousarray(x[..., :1])),
        export.torch_scores(model, x),
        atol=1e-4,
        rtol=1e-4,
    )


# ---- INT8, TensorRT, report ----------------------------------------------------------------


def test_int8_and_tensorrt_are_reported(tiny_bundle):
    report = tiny_bundle.report
    int8 = report["int8"]
    assert int8["calibration_samples"] == 16 and int8["in_bundle"]
    assert 0 < int8["bytes"] < report["onnx"]["bytes"]
    assert set(report["latency_ms_batch1"]) == {"torch_eager", "onnx_fp32", "onnx_fp32_solo", "onnx_int8"}
    q = onnx.load(str(tiny_bundle.bundle_dir / "model.int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    if export.tensorrt_available() is None:
        assert report["tensorrt"]["top1_agreement_vs_onnx"] == 1.0
    else:
        assert report["tensorrt"].startswith("skipped (")


def test_int8_scores_stay_close_to_fp32(tiny_bundle):
    """The INT8 model scores the test clips like the fp32 one.

    The untrained tiny model ranks the same class first for every test clip, so top-1 agreement alone
    would pass a broken INT8 model that happens to rank that class first too: the scores are compared.
    Measured on the tiny bundle (36 test clips, fp32 scores in [-1.87, 1.34], std 0.67): max |diff|
    0.234, mean 0.012, agreement 1.0. INT8 calibrated on all-zero clips: max 1.87, mean 0.58,
    agreement 0.0; INT8 of a model with shuffled weights: max 4.1, mean 0.76.
    """
    int8 = tiny_bundle.report["int8"]
    assert int8["top1_agreement_with_fp32"] >= 0.9
    assert int8["top1_change_points"] >= -10.0  # a few of the 36 clips (2.8 points each) at most
    clips, _ = export.split_clips(tiny_bundle.features_dir, "ntu120_xsub", "test", LoaderParams())
    fp32 = export.ort_scores(export.ort_session(tiny_bundle.bundle_dir / "model.onnx"), clips)
    q = export.ort_scores(export.ort_session(tiny_bundle.bundle_dir / "model.int8.onnx"), clips)
    diff = np.abs(q - fp32)
    assert diff.max() < 0.6 and diff.mean() < 0.06, (diff.max(), diff.mean())
    assert np.mean(q.argmax(1) == fp32.argmax(1)) == pytest.approx(int8["top1_agreement_with_fp32"], abs=1e-5)


def test_the_test_split_is_read_in_blocks(tiny_bundle):
    """The stage's checks read the test split a block at a time (NTU-120's X-Sub test split is 2 GB
    of clips as one array): the blocks are the split's clips, in order, and a seeded subset."""
    args = (tiny_bundle.features_dir, "ntu120_xsub", "test", LoaderParams())
    clips, labels = export.split_clips(*args)
    blocks = list(export.split_blocks(*args, block=5))
    assert [len(c) for c, _ in blocks] == [5] * (len(clips) // 5) + (
        [len(clips) % 5] if len(clips) % 5 else []
    )
    np.testing.assert_array_equal(np.concatenate([c for c, _ in blocks]), clips)
    np.testing.assert_array_equal(np.concatenate([y for _, y in blocks]), labels)
    subset = list(export.split_blocks(*args, limit=7, seed=3, block=4))
    assert [len(c) for c, _ in subset] == [4, 3]
    assert export.split_clips(*args, limit=7, seed=3)[0].shape[0] == 7
    runs = {"first": lambda c: c[:, 0, 0, 0, :1], "n": lambda c: np.full((len(c), 1), len(c))}
    scores, got_labels, one = export.score_blocks(runs, iter(blocks))
    np.testing.assert_array_equal(scores["first"], clips[:, 0, 0, 0, :1])
    assert scores["n"].max() == 5 and one.shape == (1, *clips.shape[1:])
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("engine", ["agrees", "disagrees"])
def test_the_tensorrt_branch_bundles_an_engine_only_when_it_agrees_with_onnx(
    tiny_bundle, tmp_path, monkeypatch, engine
):
    """The stage's TensorRT branch on a CPU machine, TensorRT itself stubbed: the engine's scores
    are ONNX Runtime's (or those with the classes rolled, so every top-1 differs); one that agrees
    goes into the bundle, its checksum in the manifest; one that does not is left out and reported."""
    built = []

    def build(onnx_path, engine_path, batches, max_frames):
        Path(engine_path).write_bytes(b"a serialized engine")
        built.append((Path(onnx_path).name, batches, max_frames))
        return {
            "version": "stub",
            "profiles": [{"batch": [1, b], "frames": [8, 64, max_frames]} for b in batches],
        }

    class Runner:
        def __init__(self, engine_path, batches):
            self.session = export.ort_session(Path(engine_path).with_name("model.onnx"), 1)

        def __call__(self, clips):
            scores = export.ort_scores(self.session, clips)
            return scores if engine == "agrees" else np.roll(scores, 1, axis=1)

    monkeypatch.setattr(export, "tensorrt_available", lambda: None)
    monkeypatch.setattr(export, "build_tensorrt", build)
    monkeypatch.setattr(export, "TensorRTRunner", Runner)
    params = export.ExportParams(int8=False, latency_runs=1, tensorrt_batches=(1, 8))
    denoise = "reference" if engine == "agrees" else "complete"  # the stage's run, once each way
    model_path = _model_denoised(tiny_bundle.model_path, tmp_path, denoise)
    report = export.run(params, LoaderParams(), FeaturesParams(), model_path=model_path,
                        features_dir=tiny_bundle.features_dir, out_dir=tmp_path / "export",
                        denoise=denoise)  # fmt: skip
    assert built == [("model.onnx", (1, 8), 300)]
    trt = report["tensorrt"]
    meta = bundle.verify(tmp_path / "export" / "bundle")
    assert meta["normalisation"].get("denoise") == ("reference" if denoise == "reference" else None)
    if engine == "agrees":
        assert (
            trt["in_bundle"] and trt["top1_agreement_vs_onnx"] == 1.0 and trt["max_abs_diff_vs_onnx"] == 0.0
        )
        assert meta["files"]["tensorrt"] == "model.plan" and trt["latency_ms_batch1"] > 0
        assert (tmp_path / "export" / "bundle" / "model.plan").read_bytes() == b"a serialized engine"
    else:
        assert not trt["in_bundle"] and trt["top1_agreement_vs_onnx"] < export.TENSORRT_MIN_AGREEMENT
        assert (
            meta["files"]["tensorrt"] is None and not (tmp_path / "export" / "bundle" / "model.plan").exists()
        )


def test_engine_parity_refuses_wrong_shapes_and_non_finite_scores():
    onnx = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    assert export.engine_parity(onnx + 1e-4, onnx) == pytest.approx(
        {"max_abs_diff_vs_onnx": 1e-4, "top1_agreement_vs_onnx": 1.0, "in_bundle": True}, abs=1e-6
    )
    assert not export.engine_parity(onnx[:, :1], onnx)["in_bundle"]
    assert not export.engine_parity(np.where(onnx > 1, np.nan, onnx), onnx)["in_bundle"]


@pytest.mark.skipif(export.tensorrt_available() is not None, reason="needs CUDA and the tensorrt package")
def test_tensorrt_engine_matches_onnx(tiny_bundle):  # pragma: no cover - GPU machines only
    engine = tiny_bundle.bundle_dir / "model.plan"
    runner = export.TensorRTRunner(engine, (1, 8, 64))
    x = np.random.default_rng(3).normal(0, 0.3, size=(9, 3, 120, 25, 2)).astype(np.float32)
    want = export.ort_scores(export.ort_session(tiny_bundle.bundle_dir / "model.onnx"), x)
    np.testing.assert_allclose(runner(x), want, atol=1e-2)


# ---- the bundle --------------------------------------------------------------------------------


def test_bundle_verifies_and_describes_the_model(tiny_bundle):
    meta = bundle.verify(tiny_bundle.bundle_dir)
    assert [c["id"] for c in meta["labels"]] == [8, 9, 50]
    # the tiny bundle is exported with tensorrt="auto": an engine where CUDA and tensorrt are present
    engine = "model.plan" if export.tensorrt_available() is None else None
    assert meta["files"] == {
        "fp32": "model.onnx",
        "int8": "model.int8.onnx",
        "tensorrt": engine,
        "solo": "model.solo.onnx",
    }
    if engine is not None:  # pragma: no cover - GPU machines only
        assert (tiny_bundle.bundle_dir / engine).is_file()
    assert meta["input"]["window"] == 64 and meta["fusion_weights"] == {"joint": 0.6, "bone": 0.6}
    assert from_mapping("loader", LoaderParams, meta["sampling"]) == LoaderParams()
    assert meta["version"] == bundle.sha256_file(tiny_bundle.bundle_dir / "model.onnx")[:12]


@pytest.mark.parametrize("damage", ["alter", "delete", "manifest", "symlink", "format", "kind"])
def test_bundle_refuses_damage(tiny_bundle, tmp_path, damage):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.bundle_dir, copy)
    if damage == "alter":
        data = bytearray((copy / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (copy / "model.onnx").write_bytes(bytes(data))
        match = "checksum mismatch"
    elif damage == "delete":
        (copy / "labels.json").unlink()
        match = "missing"
    elif damage == "manifest":
        # a file outside the bundle, there and with the right checksum: only verify's refusal of
        # names that are not plain file names of the bundle directory stops it
        (tmp_path / "outside").write_bytes(b"not part of the bundle")
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"]["../outside"] = {"sha256": bundle.sha256_file(tmp_path / "outside")}
        (copy / "manifest.json").write_text(json.dumps(manifest))
        match = r"'\.\./outside' is not a file name of the bundle directory"
    elif damage == "symlink":  # the same bytes, through a link whose target could change after the check
        shutil.move(copy / "model.onnx", tmp_path / "model.onnx")
        (copy / "model.onnx").symlink_to(tmp_path / "model.onnx")
        match = "model.onnx: a symbolic link"
    elif damage == "format":
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
        match = "format 99; this code reads 1"
    else:  # bundle.json names its model files by name: a list where a name belongs, checksummed
        meta = json.loads((copy / "bundle.json").read_text())
        meta["files"]["solo"] = ["model.solo.onnx"]
        (copy / "bundle.json").write_text(json.dumps(meta))
        bundle.write_manifest(copy)
        match = r"files\.solo = \['model\.solo\.onnx'\] is not in the manifest"
    with pytest.raises(bundle.BundleError, match=match):
        bundle.verify(copy)
    with pytest.raises(bundle.BundleError, match=r"no manifest\.json"):
        bundle.verify(tmp_path)


@pytest.mark.parametrize("batches", [(8, 8, 64), (8, 1), (0, 8), ()])
def test_tensorrt_batches_must_be_strictly_ascending(batches):
    """One optimisation profile per batch size, each from the previous size + 1: a repeated size gave
    a profile whose minimum exceeds its maximum, which TensorRT refuses at build time on a GPU."""
    with pytest.raises(ParamsError, match="strictly ascending"):
        export.ExportParams(tensorrt_batches=batches).validate()
    export.ExportParams(tensorrt_batches=(1, 8, 64)).validate()


def test_cli_rejects_bad_params(tmp_path):
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())

    def export_with(**changes):
        for section, values in changes.items():
            doc[section].update(values)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
        return subprocess.run(
            [sys.executable, "-m", "stages.export", "--params", str(tmp_path / "params.yaml"),
             "--model", "x.pt", "--features-dir", "f", "--out-dir", str(tmp_path / "out")],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip

    proc = export_with(export={"opset": 11})
    assert proc.returncode == 2 and "opset: 17 or newer" in proc.stderr
    assert not (tmp_path / "out").exists()
    # The stage reads the parse stage's denoise mode for the bundle, and checks it.
    proc = export_with(export={"opset": 17}, parse={"denoise": "ctrgcn"})
    assert proc.returncode == 2 and "denoise" in proc.stderr and "ctrgcn" in proc.stderr


def test_the_cli_gives_the_stage_the_parse_stages_denoise_mode(tmp_path, monkeypatch):
    seen, run = {}, export.run
    monkeypatch.setattr(export, "run", lambda *args, **kw: seen.update(kw) or {})
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["parse"]["denoise"] = "reference"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    args = ["--params", str(tmp_path / "params.yaml"), "--model", "x.pt", "--features-dir", "f",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert export.main(args) == 0 and seen["denoise"] == "reference"
    with pytest.raises(export.ExportError, match="denoise must be one of"):  # before any work
        run(export.ExportParams(), LoaderParams(), FeaturesParams(), model_path=tmp_path / "none.pt",
            features_dir=tmp_path, out_dir=tmp_path / "out", denoise="ctrgcn")  # fmt: skip


def _model_denoised(model_path: Path, tmp_path: Path, denoise: str) -> Path:
    """A copy of evaluate's ``model.pt`` saying its data was denoised ``denoise`` (evaluate writes
    the key only for a mode other than the default)."""
    record = torch.load(model_path, weights_only=True)
    if denoise != "complete":
        record["denoise"] = denoise
    path = tmp_path / f"model-{denoise}.pt"
    torch.save(record, path)
    return path


@pytest.mark.parametrize(("trained", "params"), [("complete", "reference"), ("reference", "complete")])
def test_export_refuses_a_denoise_mode_the_model_did_not_learn_from(tiny_bundle, tmp_path, trained, params):
    """A manual export with another params file could bundle a mode the model was not trained with:
    the server would then prepare uploaded files differently from the training data."""
    with pytest.raises(export.ExportError, match=f"denoised '{trained}', but parse.denoise is '{params}'"):
        export.run(
            export.ExportParams(), LoaderParams(), FeaturesParams(),
            model_path=_model_denoised(tiny_bundle.model_path, tmp_path, trained),
            features_dir=tiny_bundle.features_dir, out_dir=tmp_path / "out", denoise=params,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()  # before any work


def test_the_bundle_names_the_parse_stages_denoise_mode_unless_default(tmp_path):
    """The server denoises uploads as the bundle says; the default is left out, so default bundles
    are byte for byte what they were before the mode existed."""
    meta = {"class_ids": [8], "class_names": ["sitting down"], "benchmark": "ntu120-xsub",
            "streams": ["joint"], "fusion": "sum", "weights": [1.0]}  # fmt: skip
    for mode in ("complete", "reference"):
        work = tmp_path / mode
        work.mkdir()
        (work / "model.onnx").write_bytes(b"not a graph")
        export.write_bundle(work, export.ExportParams(), meta, LoaderParams(), FeaturesParams(),
                            {"fp32": "model.onnx"}, {}, mode)  # fmt: skip
        written = json.loads((work / bundle.META).read_text())["normalisation"]
        assert written.get("denoise") == (None if mode == "complete" else "reference")


# ---- the shared clip input path ------------------------------------------------------------


def test_joints_from_clip_layouts():
    one = np.random.default_rng(0).normal(size=(40, 25, 3))
    x = preprocess.joints_from_clip(one)
    assert x.shape == (3, 40, 25, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], one.transpose(2, 0, 1), rtol=1e-6)
    assert not x[..., 1].any()
    two = np.random.default_rng(1).normal(size=(2, 40, 25, 3))
    np.testing.assert_allclose(preprocess.joints_from_clip(two)[..., 1], two[1].transpose(2, 0, 1), rtol=1e-6)


@pytest.mark.parametrize(
    ("clip", "code", "words"),
    [
        (np.zeros((10, 24, 3)) + 0.1, "bad_shape", "25 joints of 3"),
        (np.zeros((10, 25, 2)) + 0.1, "bad_shape", "25 joints of 3"),
        (np.zeros((3, 10, 25, 3)) + 0.1, "bad_shape", "1 to 2 persons"),
        (np.zeros((25, 3)), "bad_shape", r"shape \(25, 3\)"),
        ([[[0.1, 0.2, 0.3]] * 25, [[0.1, 0.2]] * 25], "bad_shape", "rectangular"),
        (np.zeros((0, 25, 3)), "empty", "0 frames"),
        (np.zeros((5, 25, 3)), "empty", "no body"),
        (np.zeros((1201, 25, 3)) + 0.1, "too_long", "1201 frames"),
        (np.full((4, 25, 3), np.nan), "not_finite", "NaN or infinite"),
        (np.full((4, 25, 3), 1e6), "out_of_range", "from the camera"),
        ("not numbers", "bad_shape", "rectangular"),
    ],
)
def test_joints_from_clip_rejects_with_reasons(clip, code, words):
    with pytest.raises(preprocess.ClipError, match=words) as err:
        preprocess.joints_from_clip(clip)
    assert err.value.code == code


def test_a_raw_file_gets_the_pipelines_clip(tiny_features):
    """File -> joints -> prepare equals what the loader gives evaluate for the same stored sample."""
    table = pq.read_table(tiny_features / "samples.parquet").to_pylist()
    parsed = open_store(tiny_features.parent / "parsed" / "skeletons.zarr", required=("joints",))
    loader = LoaderParams()
    ds = SkeletonDataset(
        tiny_features, stream="joint", benchmark="ntu120_xsub", split="test", params=loader, train=False
    )
    by_index = {row["index"]: row for row in table}
    for i in range(3):
        row = by_index[int(ds.rows[i])]
        data = (tiny_features.parent / "raw" / row["file"]).read_bytes()
        joints = preprocess.joints_from_skeleton_file(data)
        stored = parsed["joints"][row["index"], :, : row["kept_frames"]]
        np.testing.assert_array_equal(joints, stored)
        clips = preprocess.prepare(joints, loader)
        assert clips.shape == (1, 3, 64, 25, 2)
        np.testing.assert_allclose(clips[0], ds[i][0].numpy(), atol=2e-3)  # the store is float16


def test_prepare_uniform_clips_and_file_errors():
    loader = LoaderParams(sampling="uniform", test_clips=3, window=16)
    x = preprocess.joints_from_clip(np.random.default_rng(0).normal(size=(50, 25, 3)))
    assert preprocess.prepare(x, loader).shape == (3, 3, 16, 25, 2)
    with pytest.raises(RejectedInput, match="frame"):
        preprocess.joints_from_skeleton_file(b"3\r\n1\r\n")
    with pytest.raises(RejectedInput):
        preprocess.joints_from_skeleton_file(b"\x00\xff garbage")
