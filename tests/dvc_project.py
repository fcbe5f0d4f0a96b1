"""The tiny DVC project of the end-to-end tests: a copy of the repository's DAG at token sizes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dvc(project: Path, *args: str) -> str:
    """``dvc *args`` in ``project`` with this interpreter's venv first on PATH and MLflow tracking to
    the project's own ``mlflow.db``; fails the test with DVC's output when it exits non-zero."""
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


def make_project(project: Path) -> Path:
    """The DAG, params and code of the repository in ``project`` (a git + DVC repository), with every
    size turned down: 16 classes of 4 performers, 2 epochs, 1 rendered video per class."""
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
    params["export"].update(calibration_samples=32, latency_runs=3, parity_samples=48)  # 3 per class
    # the pose branch at a token size: 1 small video per class, one short epoch
    params["render"].update(width=256, videos_per_class=1, workers=1)
    params["pose_data"].update(frame_stride=8, crop_size=64, frame_width=128, workers=1)
    params["train_pose"].update(max_test_crops=32, workers=0, frame_batch_size=2)
    params["train_pose"]["recipe"].update(epochs=1, batch_size=8)
    params["export_pose"].update(latency_runs=2)
    params["evaluate_video"].update(videos_per_class=1)
    params["video_skeletons"].update(workers=1)
    params["finetune_video"]["recipe"].update(epochs=1, batch_size=8)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


@dataclass(frozen=True)
class BuiltProject:
    """A tiny project after its first ``dvc repro``, and what that run printed."""

    path: Path
    first_repro: str


def copy_built(built: BuiltProject, to: Path) -> Path:
    """A private copy of a built project (its git repository, DVC cache and outputs) without its MLflow
    store, for tests that change the workspace."""
    shutil.copytree(built.path, to, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    return to
