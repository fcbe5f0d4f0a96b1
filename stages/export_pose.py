"""Stage ``export_pose``: the pose estimator as two ONNX graphs, checked against PyTorch and timed.

From ``train_pose``'s ``last.pt`` (its evaluation weights, :func:`stages.train_pose.load_estimator`):

Both graphs take uint8 BGR images ``(N, H, W, 3)`` (OpenCV's layout) and normalise them inside the
graph with :func:`models.pose.normalise_images`, the function training uses, so serving cannot
normalise differently (and ONNX Runtime does it faster than a separate step).

1. ``keypoints.onnx``: person crops ``crops (N, S, S, 3)`` (``S`` from the model config), and for a
   model that reads the other person's box (``PoseConfig.other_person``) ``other_boxes (N, 4)``
   float32 x0 y0 x1 y1 in crop pixels, NaN where the crop's person is alone ->
   ``heatmaps``, ``coords2d`` (crop pixels), ``joints3d`` (root-relative metres), ``confidence``;
   the batch is dynamic.
2. ``detect.onnx``: letterboxed frames ``frames (N, H, W, 3)`` -> person ``centre``, ``size`` and
   ``offset`` maps at 1/8; batch, H and W are dynamic (H and W multiples of the model's
   ``input_multiple``).
3. **Parity**: ONNX Runtime against PyTorch on random images and on a drawn stick figure (a crop cut
   with the training geometry, and frames of two aspect ratios). Each output's largest absolute
   difference is reported; the stage fails when any ``|onnx - torch| > tolerance * (1 + |torch|)``
   (coordinates are in pixels, so the check is relative for large values).
4. **Latency** (ONNX Runtime, ``threads`` threads): median batch-1 wall time of both graphs, and the
   per-frame cost of the video pipeline's models: one detection plus the keypoints of two crops in
   one call (four with the flip test), as frames per second (decoding and the geometry not counted).
   They go to the summary (DVC metrics) only: the output directory holds what the same checkpoint
   always exports, so a rerun that makes the same graphs leaves it unchanged and the stages that
   depend on it are not rerun (a timing in ``pose.json`` changed it on every run).
5. ``pose.json``: config, the crop and frame geometry of training (``crop_margin``, ``frame_width``:
   from the checkpoint when it records them, else the ``pose_data`` params), input and output specs,
   parity and the sha256 of both graphs, which the server checks before loading them.

    python -m stages.export_pose --checkpoint data/pose_model/last.pt --out-dir data/export_pose \\
        --summary data/reports/export_pose/metrics.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from models.pose import (
    DETECT_STRIDE,
    EXPORT_OUTPUTS,
    IMAGE_MEAN,
    IMAGE_STD,
    KEYPOINT_STRIDE,
    PoseEstimator,
    PoseGraph,
    normalise_images,
)
from models.pose_geometry import NTU_COLOR_SIZE, Camera
from models.skeleton import EDGES
from stages import training
from stages.bundle import sha256_file
from stages.export import _quiet, batch1_latency_ms, ort_session, save_onnx
from stages.params import ParamsError, load_section, usable_cpus
from stages.pose_data import PoseDataParams, cut_crop, joint_box, letterbox, square_crop
from stages.store import atomic_directory, write_metrics
from stages.train_pose import load_estimator

META = "pose.json"
FORMAT = 1
KEYPOINTS_FILE, DETECT_FILE = "keypoints.onnx", "detect.onnx"
KEYPOINTS_INPUT, DETECT_INPUT, OTHER_INPUT = "crops", "frames", "other_boxes"
PEOPLE_PER_FRAME = 2  # crops per frame in the pipeline estimate (NTU has at most two actors)


@dataclass(frozen=True)
class ExportPoseParams:
    """The ``export_pose`` section of params.yaml."""

    opset: int = 18
    parity_tolerance: float = 1e-3  # largest |ONNX - PyTorch| / (1 + |PyTorch|) accepted, any output
    latency_runs: int = 50  # batch-1 timings per graph (the median is reported)
    threads: int = 0  # ONNX Runtime / torch threads for the checks (0 = cores)
    seed: int = 0  # of the random parity inputs

    def validate(self) -> None:
        if self.opset < 17:
            raise ParamsError("params.yaml [export_pose] opset: 17 or newer")
        if self.latency_runs < 1 or self.threads < 0:
            raise ParamsError("params.yaml [export_pose]: latency_runs >= 1 and threads >= 0 required")
        if not 0 < self.parity_tolerance < 1:
            raise ParamsError("params.yaml [export_pose] parity_tolerance: in (0, 1)")


class ExportPoseError(RuntimeError):
    """The exported graphs are not faithful to the checkpoint (or it cannot be exported)."""


# ---- the checkpoint ----------------------------------------------------------------------------


def geometry(ckpt: dict, pose_data: PoseDataParams | None) -> dict:
    """``crop_margin`` and ``frame_width`` the model was trained with: the checkpoint's ``pose_data``
    entry when it has one, else ``pose_data`` (the params of the stage that cut the training crops)."""
    recorded = ckpt.get("pose_data")
    if isinstance(recorded, dict) and {"crop_margin", "frame_width"} <= set(recorded):
        return {
            "crop_margin": float(recorded["crop_margin"]),
            "frame_width": int(recorded["frame_width"]),
            "source": "checkpoint",
        }
    if pose_data is None:
        raise ExportPoseError(
            "the checkpoint does not record crop_margin and frame_width; give the pose_data params"
        )
    return {"crop_margin": pose_data.crop_margin, "frame_width": pose_data.frame_width, "source": "params"}


def frame_height(frame_width: int, multiple: int) -> int:
    """Height of a 16:9 video letterboxed to ``frame_width`` (as the detector was trained), padded
    to a multiple of ``multiple``."""
    small, _ = letterbox(np.zeros((NTU_COLOR_SIZE[1], NTU_COLOR_SIZE[0], 3), np.uint8), frame_width)
    return -(-small.shape[0] // multiple) * multiple


# ---- ONNX ------------------------------------------------------------------------------------


class ImageGraph(nn.Module):
    """A :class:`~models.pose.PoseGraph` path taking uint8 BGR images ``(N, H, W, 3)``: the graph
    normalises them with :func:`~models.pose.normalise_images`, as training does (keypoints of a model
    with ``other_person`` also take the other boxes ``(N, 4)``)."""

    def __init__(self, model: PoseEstimator, task: str):
        super().__init__()
        self.path = PoseGraph(model, task)  # not "graph": torch.export's GraphModule has that name

    def forward(self, images: torch.Tensor, other: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.path(normalise_images(images), other)  # N, 3, H, W float32 inside the graph


def takes_other(model: PoseEstimator, task: str) -> bool:
    """Whether ``task``'s graph has the second input ``other_boxes``."""
    return task == "keypoints" and model.cfg.other_person


def graph_inputs(
    model: PoseEstimator, task: str, images: np.ndarray, other: np.ndarray | None = None
) -> dict:
    """The ONNX Runtime feed of ``task``'s graph: images, and the other boxes (NaN unless given)."""
    feed = {KEYPOINTS_INPUT if task == "keypoints" else DETECT_INPUT: images}
    if takes_other(model, task):
        feed[OTHER_INPUT] = (
            np.full((len(images), 4), np.nan, np.float32) if other is None else np.asarray(other, np.float32)
        )
    return feed


def export_graph(model: PoseEstimator, task: str, path: Path, example: torch.Tensor, opset: int) -> None:
    """Export one :class:`ImageGraph` path to ``path`` (one file) for uint8 ``example`` images
    ``(N, H, W, 3)``: dynamic batch, and for ``detect`` dynamic H and W in multiples of
    ``model.cfg.input_multiple``."""
    multiple = model.cfg.input_multiple
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if task == "detect":
        dims[1] = multiple * torch.export.Dim("height_blocks", min=1, max=4096 // multiple)
        dims[2] = multiple * torch.export.Dim("width_blocks", min=1, max=4096 // multiple)
    names, args, shapes = [KEYPOINTS_INPUT if task == "keypoints" else DETECT_INPUT], (example,), (dims,)
    if takes_other(model, task):
        other = torch.tensor([[10.0, 5.0, 60.0, 90.0]]).repeat(example.shape[0], 1)
        names, args, shapes = [*names, OTHER_INPUT], (example, other), (dims, {0: dims[0]})
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            ImageGraph(model, task).eval(),
            args,
            input_names=names,
            output_names=list(EXPORT_OUTPUTS[task]),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=shapes,
            optimize=True,
        )
    save_onnx(program.model_proto, path)


def _dims(path: Path) -> dict:
    """The input, outputs, size and opset of the ONNX graph at ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inp, *more = proto.graph.input
    return {
        "input": inp.name,
        "shape": [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim],
        "other_inputs": {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in more
        },
        "outputs": [o.name for o in proto.graph.output],
        "nodes": len(proto.graph.node),
        "bytes": path.stat().st_size,
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
    }


# ---- parity inputs -------------------------------------------------------------------------------


def standing_person(camera: Camera, depth: float = 3.5, x: float = 0.0) -> np.ndarray:
    """2D joints ``(25, 2)`` (pixels of ``camera``) of a relaxed standing person facing the camera."""
    from stages.synth.body import forward_kinematics, make_shape, rest_pose

    body = forward_kinematics(make_shape(1.7), rest_pose(1))[0]  # 25, 3: stage frame, floor y = 0
    xyz = body * [-1.0, 1.0, -1.0] + [x, -0.9, depth]  # turned to face the camera, camera space
    return camera.project(xyz)


def draw_person(image: np.ndarray, uv: np.ndarray, colour=(230, 230, 230)) -> np.ndarray:
    """Bones of ``uv (25, 2)`` drawn on ``image`` (in place) as lines a few pixels wide; returns it."""
    width = max(2, round(image.shape[1] / 150))
    points = [tuple(p) for p in np.rint(uv).astype(int).tolist()]
    for child, parent in EDGES:
        cv2.line(image, points[child], points[parent], colour, width, cv2.LINE_AA)
    return image


def parity_inputs(cfg, frame_size: tuple[int, int], crop_margin: float, seed: int) -> dict:
    """uint8 BGR images per task: ``{"keypoints": [(case, (N, S, S, 3))], "detect": [...]}``."""
    rng = np.random.default_rng(seed)
    size = cfg.input_size[0]
    h, w = frame_size
    camera = Camera().scaled(w * 2, round(w * 2 * 9 / 16))  # a 16:9 video twice the detector width
    video = np.full((camera.height, camera.width, 3), 40, np.uint8)
    uv = standing_person(camera)
    draw_person(video, uv)
    draw_person(video, standing_person(camera, 4.5, 1.2), (60, 160, 230))
    crop = cut_crop(video, square_crop(joint_box(uv, np.ones(len(uv), bool)), crop_margin), size)
    frame, _ = letterbox(video, w)
    frame = np.pad(frame, ((0, h - frame.shape[0]), (0, 0), (0, 0))) if frame.shape[0] < h else frame[:h]
    noise = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    tall = (h + 2 * cfg.input_multiple, w)  # another aspect ratio: the dynamic height
    nobody = np.full(4, np.nan, np.float32)
    beside = np.array([0.55, 0.1, 0.95, 0.9], np.float32) * size  # someone on the right
    return {  # keypoints: (case, crops, other boxes); the boxes are used by models that read them
        "keypoints": [
            ("uint8_noise", noise, np.stack([beside, nobody])),
            # the figure, its mirror and a blank crop
            (
                "stick_figure",
                np.stack([crop, crop[:, ::-1], np.zeros_like(crop)]),
                np.stack([nobody, beside, beside]),
            ),
        ],
        "detect": [
            ("stick_figure", np.stack([frame, frame[:, ::-1]]), None),
            ("uint8_noise", rng.integers(0, 256, (1, *tall, 3), dtype=np.uint8), None),
        ],
    }


@torch.inference_mode()
def parity(model: PoseEstimator, sessions: dict, inputs: dict, tolerance: float) -> dict:
    """ONNX Runtime vs PyTorch on ``inputs``; raises :class:`ExportPoseError` beyond ``tolerance``."""
    report: dict = {"cases": {}, "max_abs_diff": 0.0, "max_scaled_diff": 0.0, "tolerance": tolerance}
    for task, cases in inputs.items():
        graph, session = ImageGraph(model, task).eval(), sessions[task]
        for case, x, other in cases:
            feed = graph_inputs(model, task, x, other)
            ref = [t.numpy() for t in graph(*(torch.from_numpy(v) for v in feed.values()))]
            got = session.run(list(EXPORT_OUTPUTS[task]), feed)
            diffs = {}
            for out, r, g in zip(EXPORT_OUTPUTS[task], ref, got, strict=True):
                diff = np.abs(r.astype(np.float64) - g)
                diffs[out] = float(diff.max())
                scaled = float((diff / (1.0 + np.abs(r))).max())
                report["max_scaled_diff"] = max(report["max_scaled_diff"], scaled)
            report["cases"][f"{task}/{case}"] = {"shape": list(x.shape), "max_abs_diff": diffs}
            report["max_abs_diff"] = max(report["max_abs_diff"], *diffs.values())
    if report["max_scaled_diff"] > tolerance:
        raise ExportPoseError(f"ONNX Runtime disagrees with PyTorch beyond {tolerance}: {report['cases']}")
    return report


# ---- latency -------------------------------------------------------------------------------------


def latencies(model: PoseEstimator, sessions: dict, frame_size: tuple[int, int], runs: int) -> dict:
    """Median wall times (ms) of batch-1 calls of both graphs, and the per-frame pipeline estimate."""
    rng, size = np.random.default_rng(0), model.cfg.input_size
    crops = {
        n: rng.integers(0, 256, (n, *size, 3), np.uint8) for n in (1, PEOPLE_PER_FRAME, 2 * PEOPLE_PER_FRAME)
    }
    frame = rng.integers(0, 256, (1, *frame_size, 3), np.uint8)

    def onnx(task: str):  # keypoints with other boxes given: the pipeline's two people see each other
        session = sessions[task]
        beside = np.array([[0.55, 0.1, 0.95, 0.9]], np.float32) * size[1]
        return lambda x: session.run(None, graph_inputs(model, task, x, beside.repeat(len(x), 0)))

    ms = {
        "keypoints": batch1_latency_ms(onnx("keypoints"), crops[1], runs),
        "detect": batch1_latency_ms(onnx("detect"), frame, runs),
    }
    people = batch1_latency_ms(onnx("keypoints"), crops[PEOPLE_PER_FRAME], runs)
    flipped = batch1_latency_ms(onnx("keypoints"), crops[2 * PEOPLE_PER_FRAME], runs)
    per_frame, per_frame_flip = ms["detect"] + people, ms["detect"] + flipped
    pipeline = {
        "people": PEOPLE_PER_FRAME,
        "frame_size": list(frame_size),
        f"keypoints_batch{PEOPLE_PER_FRAME}_ms": people,
        f"keypoints_batch{2 * PEOPLE_PER_FRAME}_ms": flipped,
        "ms_per_frame": round(per_frame, 3),
        "frames_per_s": round(1000 / per_frame, 2),
        "flip_test_ms_per_frame": round(per_frame_flip, 3),
        "flip_test_frames_per_s": round(1000 / per_frame_flip, 2),
    }
    return {"latency_ms_batch1": ms, "pipeline": pipeline}


# ---- the stage ----------------------------------------------------------------------------------


def describe(model: PoseEstimator, ckpt: dict, geo: dict, frame_size: tuple[int, int], paths: dict) -> dict:
    """The part of ``pose.json`` the server runs the graphs by: config, geometry, inputs and outputs,
    and the checksums it verifies them with."""
    cfg = model.cfg
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths.values()}
    digest = hashlib.sha256("".join(f["sha256"] for f in files.values()).encode()).hexdigest()
    graphs = {task: _dims(path) for task, path in paths.items()}
    meta = {
        "format": FORMAT,
        "kind": "pose_estimator",
        "version": digest[:12],
        "config": cfg.to_dict(),
        "checkpoint": {k: ckpt.get(k) for k in ("epoch", "benchmark", "eval_weights", "fingerprint")},
        "crop_margin": geo["crop_margin"],
        "frame_width": geo["frame_width"],
        "geometry_source": geo["source"],
        "input_multiple": cfg.input_multiple,
        "keypoints": {
            **graphs["keypoints"],
            "file": KEYPOINTS_FILE,
            "crop_size": list(cfg.input_size),
            "stride": KEYPOINT_STRIDE,
            "units": "coords2d: crop pixels (pixel centres); joints3d: metres relative to spine_middle",
        },
        "detect": {
            **graphs["detect"],
            "file": DETECT_FILE,
            "frame_size": list(frame_size),
            "stride": DETECT_STRIDE,
            "units": "maps at 1/8: centre probability, size (w, h) and offset (x, y) in cells",
        },
        "image": {
            "input": "uint8 BGR (N, H, W, 3); normalised in the graph: RGB / 255, minus mean, over std",
            "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD),
        },
        "opset": graphs["keypoints"]["opset"],
        "files": files,
    }
    return meta


def run(
    params: ExportPoseParams,
    pose_data: PoseDataParams | None = None,
    *,
    checkpoint: Path,
    out_dir: Path,
    summary_path: Path | None = None,
) -> dict:
    """Export, check and time the pose estimator of ``checkpoint`` into ``out_dir`` (replaced
    atomically); returns the summary (also written to ``summary_path``)."""
    started = time.perf_counter()
    ckpt = training.load_checkpoint(Path(checkpoint))
    model = load_estimator(Path(checkpoint))
    cfg = model.cfg
    geo = geometry(ckpt, pose_data)
    if geo["frame_width"] % cfg.input_multiple:
        raise ExportPoseError(f"frame_width {geo['frame_width']} is not a multiple of {cfg.input_multiple}")
    threads = params.threads or usable_cpus()
    torch.set_num_threads(threads)
    frame_size = (frame_height(geo["frame_width"], cfg.input_multiple), geo["frame_width"])
    torch.manual_seed(params.seed)
    with atomic_directory(Path(out_dir)) as tmp:
        paths = {"keypoints": tmp / KEYPOINTS_FILE, "detect": tmp / DETECT_FILE}
        examples = {
            "keypoints": torch.randint(0, 256, (2, *cfg.input_size, 3), dtype=torch.uint8),
            "detect": torch.randint(0, 256, (2, *frame_size, 3), dtype=torch.uint8),
        }
        for task, path in paths.items():
            export_graph(model, task, path, examples[task], params.opset)
        print(f"export_pose: ONNX opset {params.opset} in {time.perf_counter() - started:.1f} s")
        sessions = {task: ort_session(path, params.threads) for task, path in paths.items()}
        inputs = parity_inputs(cfg, frame_size, geo["crop_margin"], params.seed)
        checked = parity(model, sessions, inputs, params.parity_tolerance)
        print(
            f"export_pose: parity on {len(checked['cases'])} cases: max |diff| {checked['max_abs_diff']:.2e} "
            f"(scaled {checked['max_scaled_diff']:.2e}, tolerance {params.parity_tolerance})"
        )
        timing = latencies(model, sessions, frame_size, params.latency_runs)
        pipe = timing["pipeline"]
        print(
            f"export_pose: batch-1 keypoints {timing['latency_ms_batch1']['keypoints']} ms, detect "
            f"{timing['latency_ms_batch1']['detect']} ms ({frame_size[1]}x{frame_size[0]}); pipeline "
            f"{pipe['frames_per_s']} frames/s ({pipe['flip_test_frames_per_s']} with the flip test), "
            f"{threads} thread(s)"
        )
        meta = {**describe(model, ckpt, geo, frame_size, paths), "parity": checked}  # no timings
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    summary = {
        "version": meta["version"],
        "parity": {k: checked[k] for k in ("max_abs_diff", "max_scaled_diff", "tolerance")},
        **timing,
        "threads": threads,
        "nodes": {task: meta[task]["nodes"] for task in paths},
        "bytes": {task: meta[task]["bytes"] for task in paths},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if summary_path is not None:
        write_metrics(Path(summary_path), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--checkpoint", required=True, type=Path, help="train_pose's last.pt")
    ap.add_argument("--out-dir", required=True, type=Path, help="gets the graphs and pose.json (replaced)")
    ap.add_argument("--summary", type=Path, help="write the summary here as JSON (DVC metrics)")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "export_pose", ExportPoseParams)
        pose_data = load_section(args.params, "pose_data", PoseDataParams)
        summary = run(params, pose_data, checkpoint=args.checkpoint, out_dir=args.out_dir,
                      summary_path=args.summary)  # fmt: skip
    except (ParamsError, ExportPoseError, FileNotFoundError, ValueError) as exc:
        print(f"export_pose: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "parity"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
