"""Helpers of the serving tests: apps on the tiny bundle, real clips, and the PyTorch reference."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import Settings
from stages import export, preprocess
from stages.errors import RejectedInput

# Small limits, so the tests can cross them cheaply.
TEST_SETTINGS = {
    "max_frames": 300,
    "max_batch": 4,
    "max_body_bytes": 512 * 1024,
    "max_upload_bytes": 2 * 1024 * 1024,
    "stream_window": 12,
    "stream_stride": 4,
    "top_k": 5,
    "api_key": None,
    "model_uri": None,
    # no pose export unless a test passes one: never the working tree's data/export_pose
    "pose_dir": Path("/nonexistent/export_pose"),
    "video_bundle_dir": None,  # videos get the clip model unless a test passes a video bundle
}


def settings_for(bundle_dir: Path, **overrides) -> Settings:
    return Settings(**{"bundle_dir": bundle_dir, **TEST_SETTINGS, **overrides})


@contextlib.contextmanager
def serving(bundle_dir: Path, **overrides) -> Iterator[TestClient]:
    """A client of an app on ``bundle_dir``, lifespan run (the model loaded) for the ``with`` block."""
    with TestClient(create_app(settings_for(bundle_dir, **overrides))) as client:
        yield client


def raw_files(tiny_bundle) -> dict[int, tuple[bytes, np.ndarray]]:
    """A parseable raw ``.skeleton`` file per action of the tiny corpus: (bytes, joints (3, T, 25, 2))."""
    found: dict[int, tuple[bytes, np.ndarray]] = {}
    for path in sorted((tiny_bundle.features_dir.parent / "raw").rglob("*.skeleton")):
        action = int(re.search(r"A(\d{3})", path.name).group(1))
        if action in found:
            continue
        data = path.read_bytes()
        try:
            found[action] = (data, preprocess.joints_from_skeleton_file(data))
        except RejectedInput:  # the corpus has deliberately broken files
            continue
    return found


def as_clip(joints: np.ndarray, persons: int) -> list:
    """Pipeline joints ``(3, T, 25, 2)`` -> a client clip: ``(T, 25, 3)`` or ``(M, T, 25, 3)``."""
    clip = joints.transpose(3, 1, 2, 0)[:persons]  # M, T, 25, 3
    return (clip[0] if persons == 1 else clip).tolist()


class Reference:
    """The evaluate stage's view: the fused PyTorch model on the pipeline's prepared clips."""

    def __init__(self, tiny_bundle, loader, view_align: bool = False):
        self.model, _ = export.load_fused(tiny_bundle.model_path)
        self.loader, self.view_align = loader, view_align

    def scores(self, joints: np.ndarray) -> np.ndarray:
        """Scores ``(K_clips, classes)`` of pipeline joints ``(3, T, 25, 2)``."""
        return export.torch_scores(self.model, preprocess.prepare(joints, self.loader, self.view_align))

    def clip_scores(self, clip) -> np.ndarray:
        return self.scores(preprocess.joints_from_clip(clip, preprocess.ClipLimits(max_frames=300)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample ``name{labels}`` in an exposition ``text`` (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
