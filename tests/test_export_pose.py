"""The export_pose stage: two ONNX graphs faithful to the checkpoint, pose.json, a verified runtime."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from models.pose import EXPORT_OUTPUTS, PoseEstimator, normalise_images
from models.skeleton import FLIP_INDEX
from serving.pose_runtime import PoseRuntime, PoseRuntimeError
from stages import export_pose, training
from stages.bundle import sha256_file
from stages.params import ParamsError, from_mapping
from stages.pose_data import PoseDataParams
from stages.train_pose import predict_crops
from tests.pose_helpers import TINY_POSE, pose_export

CPU = training.Runtime(torch.device("cpu"), None, False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return pose_export(tmp_path_factory)


@pytest.fixture(scope="module")
def runtime(exported):
    return PoseRuntime.load(exported.dir)


def _shapes(path: Path) -> dict:
    return {
        inp.name: [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        for inp in onnx.load(str(path)).graph.input
    }


def test_pose_json_describes_checked_graphs(exported):
    meta = json.loads((exported.dir / "pose.json").read_text())
    assert meta["config"] == TINY_POSE.to_dict() and meta["kind"] == "pose_estimator"
    assert (meta["crop_margin"], meta["frame_width"], meta["geometry_source"]) == (1.3, 320, "params")
    assert meta["checkpoint"]["eval_weights"] == "model"
    kp_inputs = _shapes(exported.dir / "keypoints.onnx")
    (det,) = _shapes(exported.dir / "detect.onnx").values()
    kp, other = kp_inputs["crops"], kp_inputs["other_boxes"]
    assert isinstance(kp[0], str) and kp[1:] == [64, 64, 3]  # uint8 BGR crops: dynamic batch, fixed size
    assert other == [kp[0], 4]  # the other person's box per crop: the same dynamic batch
    assert meta["keypoints"]["other_inputs"] == {"other_boxes": other}
    assert all(isinstance(d, str) for d in det[:3]) and det[3] == 3  # frames: batch, H, W dynamic
    assert meta["keypoints"]["outputs"] == list(EXPORT_OUTPUTS["keypoints"])
    assert meta["detect"]["outputs"] == list(EXPORT_OUTPUTS["detect"])
    assert meta["detect"]["frame_size"] == [192, 320]  # 16:9 at 320 wide: 180 high, letterboxed to 192
    for name, entry in meta["files"].items():
        assert sha256_file(exported.dir / name) == entry["sha256"]
    for name in ("keypoints.onnx", "detect.onnx"):  # no trace notes with this checkout's paths
        assert b"stack_trace" not in (exported.dir / name).read_bytes()
        # nor the graph's notes, whose shape-range dict is printed in per-process string-hash order
        assert not onnx.load(str(exported.dir / name)).graph.metadata_props
    parity = meta["parity"]
    assert 0 < parity["max_scaled_diff"] <= parity["tolerance"] == 1e-3
    cases = {"keypoints/uint8_noise", "keypoints/stick_figure", "detect/stick_figure", "detect/uint8_noise"}
    assert set(parity["cases"]) == cases
    assert parity["cases"]["detect/uint8_noise"]["shape"] == [1, 208, 320, 3]  # another frame height
    metrics = json.loads(exported.metrics.read_text())
    assert metrics["version"] == meta["version"] and "seconds" not in metrics  # volatile key left out
    pipe = metrics["pipeline"]  # the timings: in the metrics, not in the output (next test)
    assert pipe["ms_per_frame"] > 0 and pipe["frames_per_s"] == round(1000 / pipe["ms_per_frame"], 2)
    assert pipe["flip_test_ms_per_frame"] > 0
    assert set(metrics["latency_ms_batch1"]) == {"keypoints", "detect"}


def test_a_rerun_exports_the_same_bytes(exported, tmp_path):
    """The output directory is a DVC dependency of the video stages: a rerun of the stage on the same
    checkpoint must leave it byte for byte as it was (no timings in pose.json), or the video branch
    reruns for nothing."""
    params = export_pose.ExportPoseParams(latency_runs=3)
    again = tmp_path / "export_pose"
    export_pose.run(params, PoseDataParams(), checkpoint=exported.checkpoint, out_dir=again)
    names = sorted(p.name for p in exported.dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (exported.dir / name).read_bytes(), name


def _flip_test_joints3d(model, crops: np.ndarray, other: np.ndarray | None) -> np.ndarray:
    """PyTorch's flip-test 3D joints, written out here (not the runtime's code): the mean of the
    crops' 3D reading and the mirrored crops' (mirrored boxes) with X negated and left/right swapped."""
    width = crops.shape[2]
    boxes = np.full((len(crops), 4), np.nan, np.float32) if other is None else other
    mirrored_boxes = np.stack([width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], 1)
    with torch.no_grad():
        plain = model(normalise_images(crops), torch.from_numpy(boxes)).joints3d.numpy()
        mirror = model(
            normalise_images(np.ascontiguousarray(crops[:, :, ::-1])), torch.from_numpy(mirrored_boxes)
        ).joints3d.numpy()
    return (plain + mirror[:, list(FLIP_INDEX)] * np.array([-1.0, 1.0, 1.0], np.float32)) / 2


def test_graphs_match_pytorch_at_new_sizes_and_the_reference_predictions(exported, runtime):
    model = exported.model
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)  # 4:3, batch 3: not exported shapes
    with torch.no_grad():
        ref = model.detect(normalise_images(frames))
    for got, want in zip(runtime.detect(frames), ref[:3], strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)
    crops = np.stack([f[:64, :64] for f in frames] + [np.zeros((64, 64, 3), np.uint8)])
    other = np.array([[30, 5, 63, 60], [np.nan] * 4, [-10, 20, 20.5, 70], [0, 0, 40, 40]], np.float32)
    for flip in (False, True):
        for boxes in (other, None):
            coords, joints3d, confidence = runtime.keypoints(crops, flip_test=flip, other=boxes)
            ref2d, ref3d, ref_conf = predict_crops(model, crops, CPU, flip_test=flip, other=boxes)
            assert coords.shape == (4, 25, 2) and joints3d.shape == (4, 25, 3) and confidence.shape == (4, 25)
            np.testing.assert_allclose(coords, ref2d, atol=2e-3)  # crop pixels
            np.testing.assert_allclose(confidence, ref_conf, atol=1e-4)
            if not flip:  # the flip test reads averaged location maps in PyTorch, averages 3D readings here
                np.testing.assert_allclose(joints3d, ref3d, atol=1e-4)
            else:  # so check it against PyTorch's readings of the crops and of their mirrors, averaged
                np.testing.assert_allclose(joints3d, _flip_test_joints3d(model, crops, boxes), atol=1e-4)
    assert coords.std() > 1.0 and joints3d.std() > 1e-3  # the outputs vary: the checks are not vacuous
    # the boxes reach the graph: a crop with someone beside it gets other keypoints than alone
    with_box = runtime.keypoints(crops, other=other)[0]
    alone = runtime.keypoints(crops)[0]
    assert np.abs(with_box[0] - alone[0]).max() > 1e-2 and np.abs(with_box[1] - alone[1]).max() == 0
    with pytest.raises(ValueError, match=re.escape("other boxes must be (4, 4)")):
        runtime.keypoints(crops, other=other[:2])


def test_runtime_refuses_altered_missing_or_undescribed_graphs(exported, tmp_path):
    copy = shutil.copytree(exported.dir, tmp_path / "pose")
    data = bytearray((copy / "keypoints.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "keypoints.onnx").write_bytes(bytes(data))
    with pytest.raises(PoseRuntimeError, match=re.escape("keypoints.onnx: checksum mismatch")):
        PoseRuntime.load(copy)
    (copy / "keypoints.onnx").unlink()
    with pytest.raises(
        PoseRuntimeError, match=re.escape("keypoints.onnx is listed in pose.json but missing")
    ):
        PoseRuntime.load(copy)
    (copy / "pose.json").write_text("{")
    with pytest.raises(PoseRuntimeError, match=re.escape("pose.json: cannot read")):
        PoseRuntime.load(copy)
    with pytest.raises(PoseRuntimeError, match=re.escape("no pose.json")):
        PoseRuntime.load(tmp_path / "nowhere")


def test_geometry_comes_from_the_checkpoint_else_the_params():
    params = PoseDataParams(crop_margin=1.5, frame_width=256)
    recorded = {"pose_data": {"crop_margin": 1.2, "frame_width": 384}}
    assert export_pose.geometry(recorded, params) == {
        "crop_margin": 1.2,
        "frame_width": 384,
        "source": "checkpoint",
    }
    assert export_pose.geometry({}, params) == {"crop_margin": 1.5, "frame_width": 256, "source": "params"}
    with pytest.raises(export_pose.ExportPoseError, match="give the pose_data params"):
        export_pose.geometry({}, None)
    assert export_pose.frame_height(320, 32) == 192 and export_pose.frame_height(640, 16) == 384


class _Session:
    """An ONNX Runtime stand-in returning PyTorch's outputs plus ``error``."""

    def __init__(self, model, task: str, error: float):
        self.graph, self.error = export_pose.ImageGraph(model, task), error

    def run(self, names, feeds):
        with torch.no_grad():
            return [
                t.numpy() + self.error for t in self.graph(*(torch.from_numpy(v) for v in feeds.values()))
            ]


def test_parity_fails_beyond_the_tolerance():
    model = PoseEstimator(TINY_POSE).eval()
    inputs = export_pose.parity_inputs(TINY_POSE, (192, 320), 1.3, seed=0)
    sessions = {task: _Session(model, task, 0.0) for task in ("keypoints", "detect")}
    assert export_pose.parity(model, sessions, inputs, 1e-3)["max_abs_diff"] == 0.0
    sessions["detect"] = _Session(model, "detect", 0.01)
    with pytest.raises(export_pose.ExportPoseError, match=re.escape("disagrees with PyTorch beyond 0.001")):
        export_pose.parity(model, sessions, inputs, 1e-3)


def test_parity_inputs_hold_a_drawn_person():
    inputs = export_pose.parity_inputs(TINY_POSE, (192, 320), 1.3, seed=0)
    name, crops, other = inputs["keypoints"][1]
    assert name == "stick_figure" and crops.shape == (3, 64, 64, 3) and crops.dtype == np.uint8
    assert crops[0, 0, 0].max() == 40 and (crops[0] > 200).sum() > 100  # bones on the floor, in the crop
    np.testing.assert_array_equal(crops[1], crops[0][:, ::-1])  # and its mirror
    assert np.isnan(other[0]).all() and (other[1:, 2] > other[1:, 0]).all()  # alone, then someone beside
    name, frames, _ = inputs["detect"][0]
    assert frames.shape == (2, 192, 320, 3) and (frames[0] > 200).any()


def test_main_reports_bad_inputs_and_params(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"export_pose": {"opset": 18}, "pose_data": {"crop_margin": 1.3}}))
    argv = [
        "--params",
        str(params),
        "--checkpoint",
        str(tmp_path / "missing.pt"),
        "--out-dir",
        str(tmp_path / "o"),
    ]
    assert export_pose.main(argv) == 2
    assert "export_pose: error:" in capsys.readouterr().err
    training.save_checkpoint(tmp_path / "other.pt", {"kind": "multistream"})
    argv[3] = str(tmp_path / "other.pt")
    assert export_pose.main(argv) == 2
    assert "not a train_pose checkpoint" in capsys.readouterr().err
    params.write_text(yaml.safe_dump({"export_pose": {"opset": 18, "latency": 3}, "pose_data": {}}))
    assert export_pose.main(argv) == 2
    assert "unknown key(s) latency" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ParamsError, match="parity_tolerance"):
        from_mapping("export_pose", export_pose.ExportPoseParams, {"parity_tolerance": 2.0})
