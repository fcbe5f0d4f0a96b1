"""Helpers of the pose export and video tests: a tiny pose checkpoint and its export, drawn videos."""

from __future__ import annotations

import types
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from models.pose import PoseConfig, PoseEstimator
from models.pose_geometry import Camera
from models.skeleton import EDGES
from stages import export_pose, training
from stages.pose_data import PoseDataParams
from tests.factory import STANDING

# The smallest estimator the code allows (two branches): exports in seconds; the same graph structure.
TINY_POSE = PoseConfig(
    stem_width=8,
    stem_blocks=0,
    widths=(8, 16),
    stage_modules=(1,),
    stage_blocks=(1,),
    detect_width=8,
    detect_widths=(8, 16),
    input_size=(64, 64),
    other_person=True,  # as train_pose makes them: the keypoint graph also takes the other boxes
)
CENTRE_LOGIT = 3.0  # sigmoid 0.953 in every cell: a person is "found" at the default threshold 0.3

_exports: dict[str, types.SimpleNamespace] = {}  # one export per test session


def write_checkpoint(path: Path, cfg: PoseConfig = TINY_POSE, seed: int = 0) -> PoseEstimator:
    """An untrained estimator saved as ``train_pose`` saves it (same payload keys).

    The weights are redrawn at He scale (the model's own init, std 0.001, makes every output nearly
    constant, which would make the parity check vacuous); the person-centre head is set to a
    constant so that the untrained detector finds people everywhere, deterministically.
    """
    torch.manual_seed(seed)
    model = PoseEstimator(cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            m.weight.data *= 0.5
    nn.init.zeros_(model.centre_head[-1].weight)
    nn.init.constant_(model.centre_head[-1].bias, CENTRE_LOGIT)
    payload = {"kind": "pose_estimator", "config": cfg.to_dict(), "model": model.state_dict(), "ema": None,
               "eval_weights": "model", "epoch": 0, "benchmark": "ntu120_xsub"}  # fmt: skip
    training.save_checkpoint(path, payload)
    return model.eval()


def pose_export(tmp_path_factory) -> types.SimpleNamespace:
    """``export_pose`` run once per session on :func:`write_checkpoint`'s model: ``dir``, ``summary``,
    ``checkpoint``, ``model``."""
    if "tiny" not in _exports:
        root = tmp_path_factory.mktemp("pose_export")
        model = write_checkpoint(root / "last.pt")
        params = export_pose.ExportPoseParams(latency_runs=3)
        summary = export_pose.run(
            params, PoseDataParams(), checkpoint=root / "last.pt", out_dir=root / "export_pose",
            summary_path=root / "metrics.json",
        )  # fmt: skip
        _exports["tiny"] = types.SimpleNamespace(
            dir=root / "export_pose", summary=summary, checkpoint=root / "last.pt", model=model,
            metrics=root / "metrics.json",
        )  # fmt: skip
    return _exports["tiny"]


def stick_figure_frames(frames: int, width: int = 320, height: int = 180) -> list[np.ndarray]:
    """A person (``tests.factory.STANDING``) walking left to right, drawn as bones on grey."""
    camera = Camera().scaled(width, height)
    out = []
    for t in range(frames):
        image = np.full((height, width, 3), 35, np.uint8)
        uv = camera.project(STANDING + np.array([0.6 * t / max(frames - 1, 1) - 0.3, 0.0, 0.0]))
        for child, parent in EDGES:
            a, b = (tuple(p) for p in np.rint(uv[[child, parent]]).astype(int).tolist())
            cv2.line(image, a, b, (225, 225, 225), 3, cv2.LINE_AA)
        out.append(image)
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    """``frames`` as ``path`` (``.avi``, ``.mkv``: MJPG; ``.mp4``, ``.mov``: mp4v; ``.webm``: VP8)."""
    codec = {".avi": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".mkv": "MJPG", ".webm": "VP80"}[path.suffix]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def damage_frames(data: bytes, frames: list[int]) -> bytes:
    """An MJPG ``.avi`` (:func:`write_video`) whose frames ``frames`` hold zeros instead of a JPEG:
    OpenCV cannot decode them, and decodes the frames after them."""
    out = bytearray(data)
    chunks, start = [], data.index(b"movi")
    while (at := data.find(b"00dc", start)) >= 0:
        chunks.append(at)
        start = at + 4
    for f in frames:
        size = int.from_bytes(data[chunks[f] + 4 : chunks[f] + 8], "little")
        out[chunks[f] + 8 : chunks[f] + 8 + size] = bytes(size)
    return bytes(out)
