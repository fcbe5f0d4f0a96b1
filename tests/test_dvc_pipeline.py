"""End to end: `dvc repro` on a copy of the project with a tiny corpus; the second run does nothing."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import zarr

from stages import bundle
from tests.dvc_project import dvc

pytestmark = pytest.mark.slow


def test_repro_builds_the_dataset_then_skips_everything(built_project):
    project, first = built_project.path, built_project.first_repro
    stages = (
        "synthesize",
        "parse",
        "features",
        "train_gcn@joint",
        "train_gcn@bone",
        "evaluate",
        "export",
        "package",
        "render",
        "pose_data",
        "train_pose",
        "export_pose",
        "video_skeletons",
        "finetune_video",
        "export_video",
        "evaluate_video",
    )
    for stage in stages:
        assert f"Running stage '{stage}'" in first
    parse_metrics = json.loads((project / "data/reports/parse.json").read_text())
    assert parse_metrics["accepted"] > 0 and parse_metrics["files"] == len(
        list((project / "data/raw/synthetic").glob("*.skeleton"))
    )
    store = zarr.open_group(str(project / "data/features/features.zarr"), mode="r")
    rows = pq.read_table(project / "data/features/samples.parquet")
    assert store["joint"].shape[0] == rows.num_rows == parse_metrics["accepted"]
    second = dvc(project, "repro")
    assert "Running stage" not in second
    assert "up to date" in dvc(project, "status")
    metrics = dvc(project, "metrics", "show")
    assert "data/reports/parse.json" in metrics and "accepted" in metrics
    assert "data/evaluate/metrics.json" in metrics and "centre_clip.fused.top1" in metrics
    evaluation = json.loads((project / "data/evaluate/metrics.json").read_text())
    assert set(evaluation["centre_clip"]) == {"fused", "joint", "bone"}
    assert (project / "data/checkpoints/bone/last.pt").exists() and (project / "mlflow.db").exists()
    exported = json.loads((project / "data/reports/export/metrics.json").read_text())
    assert exported["parity"]["top1_agreement"] == 1.0
    assert isinstance(exported["tensorrt"], dict) or exported["tensorrt"].startswith("skipped (")
    meta = bundle.verify(project / "data/export/bundle")
    assert meta["files"]["fp32"] == "model.onnx" and len(meta["labels"]) == 16
    packaged = json.loads((project / "data/reports/package.json").read_text())
    assert packaged["model_uri"] == "models:/ntu120-ctrgcn/1" and packaged["status"] == "champion"
    assert packaged["top1"] == evaluation["centre_clip"]["fused"]["top1"]
    assert packaged["bundle_version"] == meta["version"]
    rendered = list((project / "data/raw/synthetic_rgb").glob("*_rgb.avi"))
    assert len(rendered) == 16  # one per class
    pose = json.loads((project / "data/reports/pose/metrics.json").read_text())
    assert 0.0 <= pose["pck@0.2"] <= pose["pck@0.5"] <= 1.0 and pose["train_crops"] > 0
    assert (project / "data/export_pose/keypoints.onnx").exists()
    video = json.loads((project / "data/reports/video/metrics.json").read_text())
    assert video["videos"] > 0 and 0.0 <= video["video_top1"] <= 1.0
    assert 0.0 <= video["video_top1_base"] <= 1.0 and video["video_model"] == "ntu120-ctrgcn-video"
    estimated = json.loads((project / "data/reports/video_skeletons.json").read_text())
    assert estimated["videos"] > 0 and estimated["true_samples"] == estimated["videos"]
    finetuned = json.loads((project / "data/reports/finetune_video/metrics.json").read_text())
    assert finetuned["samples"] == sum(
        estimated[k] for k in ("estimated_samples", "mirrored_samples", "true_samples")
    )
    video_bundle = bundle.verify(project / "data/export_video/bundle")
    assert video_bundle["name"] == "ntu120-ctrgcn-video" and video_bundle["version"] != meta["version"]
