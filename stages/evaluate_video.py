"""Stage ``evaluate_video``: the cost of estimated poses, on held-out videos, end to end.

``python -m stages.evaluate_video --params params.yaml --video-dir DIR --skeleton-dir DIR
--pose-dir data/export_pose --bundle-dir data/export/bundle --out-dir data/reports/video``

For the videos of the held-out performers (the test half of ``evaluate_video.benchmark``), each video
goes through the service's video path (:mod:`serving.video`: decode, detect, crop, estimate, track,
lift to camera space, choose the actors) into the exported action model as one window, and beside it
the same sample's ground-truth ``.skeleton`` file goes through the service's file path into the same
model. The metrics:

- ``video_top1`` and ``skeleton_top1`` over the same videos, and their gap in points. With
  ``--video-bundle-dir`` (the ``export_video`` stage's bundle: the action model fine-tuned on the
  estimator's skeletons, :mod:`stages.finetune_video`) ``video_top1`` is that model's, as the service
  answers, and ``video_top1_base`` the skeleton model's on the same estimated joints;
  ``skeleton_top1_video_model`` is the video model's on the ``.skeleton`` files;
- ``pck@0.2`` / ``pck@0.5`` of the video path's 2D joints against the file's colour joints, over every
  labelled person of every frame (a person the estimator missed counts as wrong on all joints);
- ``mpjpe_mm`` of the lifted camera-space joints, root-relative, over the people matched;
- the video path's speed in frames per second (decode, detect, crop, estimate, lift).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.skeleton import SPINE_MIDDLE
from serving.model import load as load_action_model
from serving.pose_runtime import PoseRuntime
from serving.service import summarise_scores
from serving.settings import Settings
from serving.video import VideoOptions, skeleton_from_file
from serving.video_actions import skeleton_to_actions
from serving.video_io import VideoError
from stages import ntu_files
from stages.denoise import real_bodies
from stages.errors import RejectedInput
from stages.params import ParamsError, load_section
from stages.pose_data import COLOR_SIZE, discover_pairs
from stages.pose_metrics import torso_size
from stages.preprocess import joints_from_skeleton_file, prepare
from stages.skeleton_text import parse_skeleton
from stages.store import write_metrics


@dataclass(frozen=True)
class EvaluateVideoParams:
    """The ``evaluate_video`` section of params.yaml."""

    benchmark: str = "ntu120_xsub"  # its test half: performers the estimator and the action model never saw
    videos_per_class: int = 3  # held-out videos per class (0 = all)
    threshold: float = 0.3  # person-centre probability a detection needs
    flip_test: bool = False
    threads: int = 0  # ONNX Runtime threads (0 = cores)

    def validate(self) -> None:
        if self.benchmark not in ntu_files.BENCHMARKS:
            raise ParamsError(
                f"params.yaml [evaluate_video] benchmark {self.benchmark!r}; valid: "
                f"{', '.join(ntu_files.BENCHMARKS)}"
            )
        if self.videos_per_class < 0 or not 0 < self.threshold < 1 or self.threads < 0:
            raise ParamsError(
                "params.yaml [evaluate_video]: videos_per_class >= 0, 0 < threshold < 1, threads >= 0"
            )


def choose(pairs, benchmark: str, per_class: int):
    """The held-out pairs, at most ``per_class`` per action (in name order)."""
    taken: dict[int, int] = {}
    out = []
    for pair in pairs:
        try:
            sample = ntu_files.parse_name(pair.name)
        except ValueError:
            continue
        if pair.skeleton is None or ntu_files.split_membership(sample)[benchmark] != "test":
            continue
        if per_class and taken.get(sample.action, 0) >= per_class:
            continue
        taken[sample.action] = taken.get(sample.action, 0) + 1
        out.append((pair, sample))
    return out


def top1(model, joints: np.ndarray) -> int:
    """The action id the served model gives ``joints (3, T, 25, 2)``, its clips combined as the service
    combines them."""
    scores = model.run(prepare(joints, model.loader, model.view_align))
    return int(summarise_scores(scores, model.labels, 1, joints.shape[1], 0.0).top[0].id)


def pose_errors(
    skeleton_bytes: bytes, est2d: np.ndarray, est3d: np.ndarray, present: np.ndarray, size: tuple[int, int]
) -> dict:
    """Per-joint PCK hits and 3D errors of a video's estimates against its ``.skeleton`` labels.

    ``est2d (T, 2, 25, 2)`` video pixels, ``est3d (3, T, 25, 2)`` camera metres, ``present (T, 2)``.
    Each labelled person takes the estimated slot nearest in 2D; returns sums to pool over videos.
    """
    raw = parse_skeleton(skeleton_bytes)
    scale = np.array([size[0] / COLOR_SIZE[0], size[1] / COLOR_SIZE[1]])
    out = {"joints": 0, "hit@0.2": 0, "hit@0.5": 0, "people": 0, "missed": 0, "err3d_sum": 0.0, "matched": 0}
    for records in real_bodies(raw):
        for r in records.tolist():
            t = int(raw.frame_index[r])
            if t >= len(present):
                continue
            uv = raw.colors[r] * scale
            visible = (raw.tracking[r] > 0) & (uv >= 0).all(1) & (uv[:, 0] < size[0]) & (uv[:, 1] < size[1])
            torso = float(torso_size(uv[None])[0])
            if visible.sum() < 2 or torso < 1e-3:
                continue
            out["people"] += 1
            out["joints"] += int(visible.sum())
            slots = [m for m in range(present.shape[1]) if present[t, m]]
            if not slots:
                out["missed"] += 1
                continue
            dist = [np.linalg.norm(est2d[t, m] - uv, axis=-1)[visible].mean() for m in slots]
            m = slots[int(np.argmin(dist))]
            err = np.linalg.norm(est2d[t, m] - uv, axis=-1)[visible] / torso
            out["hit@0.2"] += int((err <= 0.2).sum())
            out["hit@0.5"] += int((err <= 0.5).sum())
            est = est3d[:, t, :, m].T  # 25, 3
            true = raw.joints[r].astype(np.float64)
            out["err3d_sum"] += float(
                np.linalg.norm((est - est[SPINE_MIDDLE]) - (true - true[SPINE_MIDDLE]), axis=-1).mean()
            )
            out["matched"] += 1
    return out


def run(
    params: EvaluateVideoParams,
    *,
    video_dir: Path,
    skeleton_dir: Path,
    pose_dir: Path,
    bundle_dir: Path,
    out_dir: Path,
    video_bundle_dir: Path | None = None,
) -> dict:
    """Evaluate the held-out videos; writes ``metrics.json`` and ``per_video.csv`` into ``out_dir``."""
    chosen = choose(
        discover_pairs(Path(video_dir), Path(skeleton_dir)), params.benchmark, params.videos_per_class
    )
    if not chosen:  # e.g. a corpus rendered for a few classes only: nothing to measure is not an error
        print(f"evaluate_video: no held-out ({params.benchmark} test) video with a .skeleton in {video_dir}")
    pose = PoseRuntime.load(Path(pose_dir), threads=params.threads)
    model = load_action_model(
        Settings.without_environment(bundle_dir=Path(bundle_dir), workers=1, threads=params.threads)
    )
    video_model = model
    if video_bundle_dir is not None:
        video_model = load_action_model(
            Settings.without_environment(bundle_dir=Path(video_bundle_dir), workers=1, threads=params.threads)
        )
    options = VideoOptions(threshold=params.threshold, flip_test=params.flip_test, window=0)
    rows, totals, seconds, frames = [], {}, 0.0, 0
    for pair, sample in tqdm(chosen, desc="evaluate_video", unit="video"):
        data = Path(pair.skeleton).read_bytes()
        row = {
            "name": pair.name,
            "action": sample.action,
            "skeleton_pred": None,
            "video_pred": None,
            "video_pred_base": None,
            "skeleton_pred_video_model": None,
            "reason": "",
        }
        try:
            true_joints = joints_from_skeleton_file(data, model.denoise)
            row["skeleton_pred"] = top1(model, true_joints)
            if video_model.denoise != model.denoise:  # each model gets the file as its bundle says
                true_joints = joints_from_skeleton_file(data, video_model.denoise)
            row["skeleton_pred_video_model"] = top1(video_model, true_joints)
        except RejectedInput as exc:
            row["reason"] = f"skeleton {exc.code}: {exc.message}"
            rows.append(row)
            continue
        start = time.perf_counter()
        try:
            _, skeleton = skeleton_from_file(Path(pair.video), pose, options)
        except VideoError as exc:
            row["reason"] = f"video {exc.code}: {exc.message}"
            rows.append(row)
            continue
        seconds += time.perf_counter() - start
        frames += skeleton.frames
        for key, scorer in (("video_pred", video_model), ("video_pred_base", model)):
            (whole,) = skeleton_to_actions(skeleton.joints, scorer, window=0, top=1)  # as the service does
            row[key] = int(whole.prediction.top[0].id)
        errors = pose_errors(data, skeleton.joints2d, skeleton.joints, skeleton.present, skeleton.size)
        for k, v in errors.items():
            totals[k] = totals.get(k, 0) + v
        row["pck@0.2"] = round(errors["hit@0.2"] / max(errors["joints"], 1), 4)
        rows.append(row)
    scored = [r for r in rows if r["skeleton_pred"] is not None]
    n = max(len(scored), 1)  # no video: the figures below are 0 beside videos = 0
    skeleton_top1 = sum(r["skeleton_pred"] == r["action"] for r in scored) / n

    def accuracy(key: str) -> float:  # a failed video counts as wrong
        return sum(r[key] == r["action"] for r in scored) / n

    video_top1 = accuracy("video_pred")
    metrics = {
        "videos": len(scored),
        "video_failures": sum(r["video_pred"] is None for r in scored),
        "skeleton_top1": round(skeleton_top1, 4),
        "video_top1": round(video_top1, 4),
        "gap_points": round(100 * (skeleton_top1 - video_top1), 2),
        "video_model": video_model.meta["name"],
        "video_top1_base": round(accuracy("video_pred_base"), 4),
        "skeleton_top1_video_model": round(accuracy("skeleton_pred_video_model"), 4),
        "pck@0.2": round(totals.get("hit@0.2", 0) / max(totals.get("joints", 0), 1), 4),
        "pck@0.5": round(totals.get("hit@0.5", 0) / max(totals.get("joints", 0), 1), 4),
        "people_missed": round(totals.get("missed", 0) / max(totals.get("people", 0), 1), 4),
        "mpjpe_mm": round(1000 * totals.get("err3d_sum", 0.0) / max(totals.get("matched", 0), 1), 1),
        "frames": frames,
        "frames_per_s": round(frames / max(seconds, 1e-9), 1),
        "pose_provider": pose.provider,
        "params": asdict(params),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_video.csv").open("w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=[
                *("name", "action", "skeleton_pred", "video_pred", "video_pred_base"),
                *("skeleton_pred_video_model", "pck@0.2", "reason"),
            ],
        )
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in writer.fieldnames} for r in rows)
    write_metrics(out_dir / "metrics.json", {k: v for k, v in metrics.items() if k != "frames_per_s"})
    (out_dir / "speed.json").write_text(
        json.dumps({"frames_per_s": metrics["frames_per_s"], "frames": frames}) + "\n"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--video-dir", required=True, type=Path)
    ap.add_argument("--skeleton-dir", required=True, type=Path)
    ap.add_argument("--pose-dir", required=True, type=Path, help="the export_pose stage's output")
    ap.add_argument("--bundle-dir", required=True, type=Path, help="the export stage's action bundle")
    ap.add_argument(
        "--video-bundle-dir", type=Path, help="export_video's bundle: the video path's action model"
    )
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "evaluate_video", EvaluateVideoParams)
        metrics = run(
            params,
            video_dir=args.video_dir,
            skeleton_dir=args.skeleton_dir,
            pose_dir=args.pose_dir,
            bundle_dir=args.bundle_dir,
            out_dir=args.out_dir,
            video_bundle_dir=args.video_bundle_dir,
        )
    except (ParamsError, FileNotFoundError, RejectedInput) as exc:
        print(f"evaluate_video: error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "params"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
