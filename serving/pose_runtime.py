"""The pose estimator's two ONNX graphs (the ``export_pose`` stage's output) in ONNX Runtime.

:meth:`PoseRuntime.load` checks every graph against the sha256 in ``pose.json`` before opening it
(a missing, truncated or altered file is refused), then runs both on the CUDA provider when this
ONNX Runtime has it, else on the CPU. Images go in as uint8 BGR (OpenCV's layout); the graphs
normalise them with the function training used (:func:`models.pose.normalise_images`).

Anything with the attributes and methods of :class:`PoseRuntime` used by :mod:`serving.video`
(``crop_size``, ``frame_width``, ``crop_margin``, ``input_multiple``, :meth:`~PoseRuntime.detect`,
:meth:`~PoseRuntime.keypoints`) can stand in for it (the tests use fakes with known answers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.pose import (
    PoseConfig,
    flip_boxes,
    flip_heatmaps,
    flip_joints3d,
    heatmap_to_input,
    soft_argmax,
)
from stages.bundle import sha256_file
from stages.params import usable_cpus

META = "pose.json"  # stages.export_pose.META (not imported: serving needs no exporter)
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class PoseRuntimeError(RuntimeError):
    """The pose export cannot be served: missing, incomplete, altered or not loadable."""


def verify(pose_dir: Path) -> dict:
    """``pose.json`` of ``pose_dir`` after checking both graphs against its checksums."""
    pose_dir = Path(pose_dir)
    meta_path = pose_dir / META
    if not meta_path.is_file():
        raise PoseRuntimeError(f"{pose_dir}: no {META} (not a pose export; run `dvc repro export_pose`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoseRuntimeError(f"{meta_path}: cannot read ({exc})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    needed = [meta.get(task, {}).get("file") for task in ("keypoints", "detect")] if files else []
    if not files or not all(needed) or not set(needed) <= set(files):
        raise PoseRuntimeError(f"{meta_path}: must list the keypoints and detect graphs with checksums")
    for name, entry in files.items():
        path = pose_dir / name
        if Path(name).name != name or not path.is_file():
            raise PoseRuntimeError(f"{pose_dir}: {name} is listed in {META} but missing")
        if not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            raise PoseRuntimeError(f"{path}: checksum mismatch (altered or corrupt); refusing to load it")
    return meta


def providers() -> list[str]:
    """The ONNX Runtime providers of :data:`PROVIDERS` this installation has, best first."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDERS if p in available]


def _session(path: Path, threads: int, chosen: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Between graph calls the video path decodes, crops and lifts on the same cores; idle workers
    # spinning for the next call starve it (measured: 20 -> 37 frames/s on 2 shared cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception kinds for a bad graph
        raise PoseRuntimeError(f"{path}: ONNX Runtime cannot load it ({exc})") from None


class PoseRuntime:
    """Person detection on frames and keypoints on crops with the exported graphs (thread-safe)."""

    def __init__(self, meta: dict, keypoints_session, detect_session, source: str = ""):
        self.meta, self.source = meta, source
        self._keypoints, self._detect = keypoints_session, detect_session
        self.config = PoseConfig.from_dict(meta["config"])
        self.crop_size = int(self.config.input_size[0])
        self.frame_width = int(meta["frame_width"])
        self.crop_margin = float(meta["crop_margin"])
        self.input_multiple = self.config.input_multiple
        self.version = str(meta.get("version", ""))
        self.provider = keypoints_session.get_providers()[0]
        kp_inputs = [i.name for i in keypoints_session.get_inputs()]
        self._kp_input = kp_inputs[0]
        # a model that reads the other person's box (PoseConfig.other_person) has a second input
        self._other_input = kp_inputs[1] if len(kp_inputs) > 1 else None
        self._det_input = detect_session.get_inputs()[0].name

    @classmethod
    def load(cls, pose_dir: Path, threads: int = 0) -> PoseRuntime:
        """Verify ``pose_dir`` (:func:`verify`) and open both graphs; raises :class:`PoseRuntimeError`."""
        meta = verify(pose_dir)
        try:
            PoseConfig.from_dict(meta["config"])
            float(meta["crop_margin"]), int(meta["frame_width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PoseRuntimeError(
                f"{Path(pose_dir) / META}: not a pose export description ({exc})"
            ) from None
        chosen = providers()
        sessions = [
            _session(Path(pose_dir) / meta[task]["file"], threads, chosen) for task in ("keypoints", "detect")
        ]
        if any(s.get_inputs()[0].type != "tensor(uint8)" for s in sessions):
            raise PoseRuntimeError(f"{pose_dir}: the graphs do not take uint8 images (an older export?); "
                                   "run the export_pose stage again")  # fmt: skip
        return cls(meta, *sessions, source=str(pose_dir))

    def describe(self) -> dict:
        return {"version": self.version, "provider": self.provider, "source": self.source}

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 BGR frames ``(N, H, W, 3)`` (H, W multiples of ``input_multiple``) -> the maps
        ``centre (N, 1, h, w)``, ``size (N, 2, h, w)``, ``offset (N, 2, h, w)`` at 1/8."""
        x = np.ascontiguousarray(frames, dtype=np.uint8)
        centre, size, offset = self._detect.run(None, {self._det_input: x})
        return centre, size, offset

    def keypoints(
        self, crops: np.ndarray, flip_test: bool = False, other: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 BGR crops ``(N, S, S, 3)`` -> ``coords2d (N, 25, 2)`` crop pixels, ``joints3d
        (N, 25, 3)`` metres relative to the root, ``confidence (N, 25)`` in [0, 1].

        ``other`` ``(N, 4)``: the box of the other person found in each crop's frame (x0 y0 x1 y1,
        crop pixels; NaN where the person is alone). Graphs of models that read it get it (NaN for
        all when ``None``); others ignore it.

        ``flip_test``: each crop and its mirror run in one call; the heatmaps are averaged (the
        mirror's flipped back) and decoded by the model's soft-argmax, as training's evaluation does.
        The graphs do not output the location maps, so the 3D joints are the average of the two 3D
        readings instead of a reading of the averaged maps.
        """
        n = len(crops)
        batch = np.concatenate([crops, crops[:, :, ::-1]]) if flip_test else crops
        feed = {self._kp_input: np.ascontiguousarray(batch, dtype=np.uint8)}
        if self._other_input is not None:
            boxes = np.full((n, 4), np.nan, np.float32) if other is None else np.asarray(other, np.float32)
            if boxes.shape != (n, 4):
                raise ValueError(f"other boxes must be ({n}, 4); got {boxes.shape}")
            if flip_test:  # the mirror's boxes
                boxes = np.concatenate([boxes, flip_boxes(torch.from_numpy(boxes), crops.shape[2]).numpy()])
            feed[self._other_input] = np.ascontiguousarray(boxes, dtype=np.float32)
        heatmaps, coords, joints3d, confidence = self._keypoints.run(None, feed)
        if not flip_test:
            return coords, joints3d, confidence
        heat = torch.from_numpy(heatmaps)
        averaged = (heat[:n] + flip_heatmaps(heat[n:])) / 2  # N, 25, h, w
        xy, _ = soft_argmax(averaged, self.config.beta)
        conf = averaged.flatten(2).amax(-1).clamp(0.0, 1.0)
        j3d = torch.from_numpy(joints3d)
        both = (j3d[:n] + flip_joints3d(j3d[n:])) / 2
        return heatmap_to_input(xy).numpy(), both.numpy(), conf.numpy()
