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
    """``frames`` as ``path`` (``.avi``, ``.mkv``: MJPG; ``.mp4``, ``.mov``, ``.3gp``: mp4v; ``.webm``:
    VP8)."""
    codec = {".avi": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".3gp": "mp4v", ".mkv": "MJPG", ".webm": "VP80"}[
        path.suffix
    ]
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


# ---- real-world containers, made from OpenCV's files by rewriting their headers ---------------------

_EBML_MASTERS = {0x18538067, 0x1549A966, 0x1654AE6B, 0xAE, 0x1F43B675}  # Segment Info Tracks Track Cluster


def _ebml_number(data: bytes, at: int, marker: bool) -> tuple[int, int]:
    """An EBML variable-length number at ``at``: (value, bytes); ``marker`` keeps the length bit (IDs)."""
    length = 1
    while not data[at] & (0x80 >> (length - 1)):
        length += 1
    value = data[at] if marker else data[at] & (0xFF >> length)
    for byte in data[at + 1 : at + length]:
        value = value << 8 | byte
    return value, length


def _ebml_elements(data: bytes, start: int, end: int):
    """``(id, start, data start, end)`` of the elements in ``data[start:end]``, depth first."""
    at = start
    while at < end:
        element, id_length = _ebml_number(data, at, True)
        size, size_length = _ebml_number(data, at + id_length, False)
        body = at + id_length + size_length
        stop = min(body + size, end) if size != (1 << (7 * size_length)) - 1 else end
        yield element, at, body, stop
        if element in _EBML_MASTERS:
            yield from _ebml_elements(data, body, stop)
        at = stop


def browser_recording(
    path: Path, frames: list[np.ndarray], times_ms: list[int], rate_in_header: bool = False
) -> Path:
    """``frames`` as a Matroska file shaped like a browser's MediaRecorder WebM: no frame rate
    (DefaultDuration) and no duration in its header, and each frame at its capture time ``times_ms``
    (a camera's frames are not evenly spaced). FFmpeg, and so OpenCV, give such a file 1000 fps (the
    unit of its timestamps) and no frame count. ``rate_in_header``: keep the 30 fps and the duration
    OpenCV wrote (the same frames at the same times, in a file that says its rate)."""
    assert len(times_ms) == len(frames)
    data = write_video(path.with_suffix(".mkv"), frames).read_bytes()
    out, base, block = bytearray(data), 0, 0
    for element, at, body, stop in _ebml_elements(data, 0, len(data)):
        if element in (0x23E383, 0x4489) and not rate_in_header:  # DefaultDuration, Duration -> Void
            out[at : at + 3] = bytes([0xEC, 0x40 | (stop - at - 3) >> 8, (stop - at - 3) & 0xFF])
            out[at + 3 : stop] = bytes(stop - at - 3)
        elif element == 0xE7:  # a cluster's timestamp: its blocks' are relative to it
            base = int.from_bytes(data[body:stop], "big")
        elif element == 0xA3:  # SimpleBlock: track number, then the 16-bit relative timestamp
            _, track_length = _ebml_number(data, body, False)
            at = body + track_length
            out[at : at + 2] = (times_ms[block] - base).to_bytes(2, "big", signed=True)
            block += 1
    assert block == len(frames)
    path.with_suffix(".mkv").unlink()
    path.write_bytes(bytes(out))
    return path


def rotated_mp4(path: Path, frames: list[np.ndarray], degrees: int) -> Path:
    """``frames`` as an ``.mp4`` whose track header says to show them turned ``degrees`` clockwise, as
    a phone stores a portrait video: landscape frames and a rotation."""
    data = bytearray(write_video(path, frames).read_bytes())
    tkhd = data.rindex(b"tkhd") + 4  # the track header box's body (in moov, after the frames)
    assert data[tkhd] == 0
    one = 1 << 16
    a, b, c, d = {90: (0, one, -one, 0), 180: (-one, 0, 0, -one), 270: (0, -one, one, 0)}[degrees]
    matrix = (a, b, 0, c, d, 0, 0, 0, 1 << 30)  # 16.16 fixed point, the last 2.30
    data[tkhd + 40 : tkhd + 76] = b"".join(v.to_bytes(4, "big", signed=True) for v in matrix)
    path.write_bytes(bytes(data))
    return path
