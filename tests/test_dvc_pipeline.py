"""End to end: `dvc repro` on a copy of the project with a tiny corpus; the second run does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from stages import bundle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def dvc(project: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",  # never the developer's store
    }
    env.pop("MLFLOW_PARENT_RUN_ID", None)
    result = subprocess.run(
        [str(bin_dir / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    for package in ("models", "stages", "serving"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["synthesize"].update(num_subjects=4, num_setups=2, num_sessions=4, workers=1)
    params["parse"]["workers"] = 1
    params["train"].update(eval_every=2, workers=0)
    params["train"]["recipes"]["adamw"].update(epochs=2, batch_size=16)
    params["evaluate"].update(multi_clips=0, workers=0)
    params["export"].update(calibration_samples=32, latency_runs=3)
    # the pose branch at a token size: 2 small videos per class, one short epoch
    params["render"].update(width=256, videos_per_class=1, workers=1)
    params["pose_data"].update(frame_stride=8, crop_size=64, frame_width=128, workers=1)
    params["train_pose"].update(max_test_crops=32, workers=0, frame_batch_size=2)
    params["train_pose"]["recipe"].update(epochs=1, batch_size=8)
    params["export_pose"].update(latency_runs=2)
    params["evaluate_video"].update(videos_per_class=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


def test_repro_builds_the_dataset_then_skips_everything(project):
    first = dvc(project, "repro")
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
