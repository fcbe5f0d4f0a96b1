"""Stage ``video_skeletons``: the pose estimator's skeletons of the training videos.

``python -m stages.video_skeletons --params params.yaml --video-dir DIR --skeleton-dir DIR
--pose-dir data/export_pose --out-dir data/video_skeletons --summary data/reports/video_skeletons.json``

The action model learns from Kinect skeletons; the video path hands it the estimator's, which miss
frames and people, swap limbs and carry tens of millimetres of noise. This stage makes the data to
close that gap (:mod:`stages.finetune_video`): every training-split video (the train half of
``video_skeletons.benchmark``: performers ``evaluate_video`` never scores) goes through the video
path's own code (:func:`serving.video.skeleton_from_file`, then
:func:`serving.video_actions.window_joints` as the service lays out a whole-video window), and beside
it the same sample's ``.skeleton`` file through the file path
(:func:`stages.preprocess.joints_from_skeleton_file`). With ``mirrored`` each video also goes through
the video path flipped left to right: a second estimated sample of the same action, by a mirrored
performer, with the estimator's errors on another image (flip augmentation, in the estimator's
output rather than the Kinect's).

Output ``skeletons.npz`` (``np.load`` without pickle): per source (``estimated``, ``true``) the
samples' joints concatenated along time, ``float32 (3, sum T, 25, 2)`` camera-space metres, with
``<source>_offsets (N + 1,)``, ``<source>_names`` and ``<source>_actions (N,)``; a mirrored
estimate is an ``estimated`` sample named ``<name>/mirrored``. A sample whose
video is rejected (unreadable, nobody found) is left out of ``estimated`` and one whose ``.skeleton``
is malformed out of both; each is listed in the summary with the reason, and the rest go on. Videos
run in ``workers`` processes, one ONNX Runtime thread each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.pose_runtime import PoseRuntimeError, verify
from stages import ntu_files
from stages.denoise import COMPLETE
from stages.errors import RejectedInput
from stages.params import ParamsError, load_section, usable_cpus
from stages.parse import denoise_mode
from stages.pose_data import discover_pairs
from stages.store import atomic_directory, write_metrics

SOURCES = ("estimated", "true")
FILE = "skeletons.npz"


@dataclass(frozen=True)
class VideoSkeletonsParams:
    """The ``video_skeletons`` section of params.yaml."""

    benchmark: str = "ntu120_xsub"  # its train half: the performers the action model trained on
    videos_per_class: int = 0  # training videos per class (0 = all)
    threshold: float = 0.3  # person-centre probability a detection needs (the service's default)
    flip_test: bool = False  # as the service runs by default
    mirrored: bool = True  # also each video flipped left to right: a second estimated sample
    workers: int = 0  # processes (0 = one per core), one ONNX Runtime thread each

    def validate(self) -> None:
        if self.benchmark not in ntu_files.BENCHMARKS:
            raise ParamsError(
                f"params.yaml [video_skeletons] benchmark {self.benchmark!r}; valid: "
                f"{', '.join(ntu_files.BENCHMARKS)}"
            )
        if self.videos_per_class < 0 or not 0 < self.threshold < 1 or self.workers < 0:
            raise ParamsError(
                "params.yaml [video_skeletons]: videos_per_class >= 0, 0 < threshold < 1, workers >= 0"
            )


def choose_training(pairs, benchmark: str, per_class: int) -> list[tuple]:
    """The pairs of the benchmark's train half with a ``.skeleton``, at most ``per_class`` per action
    (in name order): ``(pair, sample)``."""
    taken: dict[int, int] = {}
    out = []
    for pair in pairs:
        try:
            sample = ntu_files.parse_name(pair.name)
        except ValueError:
            continue
        if pair.skeleton is None or ntu_files.split_membership(sample)[benchmark] != "train":
            continue
        if per_class and taken.get(sample.action, 0) >= per_class:
            continue
        taken[sample.action] = taken.get(sample.action, 0) + 1
        out.append((pair, sample))
    return out


_WORKER: dict = {}


def _init_worker(
    pose_dir: str, threads: int, threshold: float, flip_test: bool, mirrored: bool, denoise: str = COMPLETE
) -> None:
    from serving.pose_runtime import PoseRuntime
    from serving.video import VideoOptions

    _WORKER["pose"] = PoseRuntime.load(Path(pose_dir), threads=threads)
    _WORKER["options"] = VideoOptions(threshold=threshold, flip_test=flip_test, window=0)
    _WORKER["mirrored"] = mirrored
    _WORKER["denoise"] = denoise  # the parse stage's mode, for the true joints of each .skeleton


def estimate_one(video: str, skeleton: str) -> dict:
    """One pair -> ``{"true", "estimated"}`` joints ``(3, T, 25, 2)`` (and ``"mirrored"``, the mirrored
    video's, when the worker makes them and it has someone) and the frames; a rejected side is missing
    and ``reason`` says why."""
    from serving.video import skeleton_from_file
    from serving.video_actions import window_joints
    from stages.preprocess import joints_from_skeleton_file

    try:
        true = joints_from_skeleton_file(Path(skeleton).read_bytes(), _WORKER.get("denoise", COMPLETE))
    except RejectedInput as exc:
        return {"reason": f"skeleton {exc.code}: {exc.message}"}
    except OSError as exc:
        return {"reason": f"skeleton unreadable: {exc}"}
    try:
        _, skel = skeleton_from_file(Path(video), _WORKER["pose"], _WORKER["options"])
    except RejectedInput as exc:
        return {"true": true, "reason": f"video {exc.code}: {exc.message}"}
    estimated = window_joints(skel.joints, 0, skel.frames)  # the service's whole-video window
    if estimated is None:
        return {"true": true, "reason": "video no_person: nobody found in any frame", "frames": skel.frames}
    out = {"estimated": estimated, "true": true, "frames": skel.frames}
    if _WORKER.get("mirrored"):
        try:
            _, flipped = skeleton_from_file(Path(video), _WORKER["pose"], _WORKER["options"], mirror=True)
        except RejectedInput:  # the unmirrored video was read: nobody found this way round
            return out
        mirrored = window_joints(flipped.joints, 0, flipped.frames)
        if mirrored is not None:
            out["mirrored"] = mirrored
        out["frames"] += flipped.frames
    return out


def _concat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.shape[1] for a in arrays])
    if not arrays:
        return np.zeros((3, 0, 25, 2), np.float32), offsets
    return np.concatenate(arrays, axis=1).astype(np.float32), offsets


def save(out_dir: Path, rows: dict[str, list[tuple[str, int, np.ndarray]]]) -> None:
    """Write ``skeletons.npz`` into ``out_dir`` (replaced atomically) from ``(name, action, joints)``
    rows per source."""
    arrays: dict[str, np.ndarray] = {}
    for source in SOURCES:
        chosen = rows.get(source, [])
        arrays[source], arrays[f"{source}_offsets"] = _concat([j for _, _, j in chosen])
        arrays[f"{source}_names"] = np.array([n for n, _, _ in chosen], dtype=str)
        arrays[f"{source}_actions"] = np.array([a for _, a, _ in chosen], dtype=np.int16)
    with atomic_directory(Path(out_dir)) as tmp:
        np.savez(tmp / FILE, **arrays)


def load(path: Path) -> dict[str, dict]:
    """``skeletons.npz`` -> per source ``{"joints": [(3, T, 25, 2)...], "names", "actions"}``."""
    out = {}
    with np.load(Path(path) / FILE, allow_pickle=False) as data:
        for source in SOURCES:
            joints, offsets = data[source], data[f"{source}_offsets"]
            out[source] = {
                "joints": [joints[:, a:b] for a, b in itertools.pairwise(offsets)],
                "names": data[f"{source}_names"].tolist(),
                "actions": data[f"{source}_actions"].astype(np.int64),
            }
    return out


def run(
    params: VideoSkeletonsParams,
    *,
    video_dir: Path,
    skeleton_dir: Path,
    pose_dir: Path,
    out_dir: Path,
    summary_path: Path | None = None,
    denoise: str = COMPLETE,
) -> dict:
    """Estimate the training videos' skeletons into ``out_dir/skeletons.npz``; returns the summary.
    ``denoise``: the parse stage's mode (``parse.denoise``), for the Kinect files' true joints."""
    verify(Path(pose_dir))  # a missing or altered export stops the stage before any work
    chosen = choose_training(
        discover_pairs(Path(video_dir), Path(skeleton_dir)), params.benchmark, params.videos_per_class
    )
    workers = max(1, min(params.workers or usable_cpus(), len(chosen) or 1))
    started = time.perf_counter()
    results: list[dict] = []
    init = (
        str(pose_dir),
        1 if workers > 1 else 0,
        params.threshold,
        params.flip_test,
        params.mirrored,
        denoise,
    )
    if workers == 1:
        _init_worker(*init)
        results = [estimate_one(p.video, p.skeleton) for p, _ in tqdm(chosen, desc="video_skeletons")]
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with concurrent.futures.ProcessPoolExecutor(workers, context, _init_worker, init) as pool:
            jobs = pool.map(estimate_one, [p.video for p, _ in chosen], [p.skeleton for p, _ in chosen])
            results = list(tqdm(jobs, total=len(chosen), desc="video_skeletons", unit="video"))
    if not chosen:
        raise ValueError(
            f"no {params.benchmark} training-split video with a .skeleton under {video_dir} "
            f"(.skeleton files from {skeleton_dir})"
        )
    seconds = time.perf_counter() - started
    rejected = [
        {"name": pair.name, "reason": r["reason"]}
        for (pair, _), r in zip(chosen, results, strict=True)
        if "reason" in r
    ]
    rows = {
        source: [
            (p.name, sample.action, r[source])
            for (p, sample), r in zip(chosen, results, strict=True)
            if source in r
        ]
        for source in SOURCES
    }
    rows["estimated"] += [
        (f"{p.name}/mirrored", sample.action, r["mirrored"])
        for (p, sample), r in zip(chosen, results, strict=True)
        if "mirrored" in r
    ]
    save(Path(out_dir), rows)
    true_samples = sum("true" in r for r in results)
    frames = sum(r.get("frames", 0) for r in results)
    estimated = [r["estimated"] for r in results if "estimated" in r]
    summary = {
        "videos": len(chosen),
        "estimated_samples": len(estimated),
        "mirrored_samples": sum("mirrored" in r for r in results),
        "true_samples": true_samples,
        "rejected": len(rejected),
        "rejections": rejected[:50],
        "frames": frames,
        "estimated_two_person": int(sum(bool(e[..., 1].any()) for e in estimated)),
        "true_two_person": int(sum(bool(r["true"][..., 1].any()) for r in results if "true" in r)),
        "frames_per_s": round(frames / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 1),
        "workers": workers,
        "params": asdict(params),
    }
    if summary_path is not None:
        write_metrics(Path(summary_path), summary)
    print(
        f"video_skeletons: {len(estimated)} of {len(chosen)} training videos estimated ({frames} frames, "
        f"{summary['frames_per_s']} frames/s with {workers} process(es)); {len(rejected)} rejected"
    )
    for row in rejected[:5]:
        print(f"  rejected {row['name']}: {row['reason']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--video-dir", required=True, type=Path)
    ap.add_argument("--skeleton-dir", required=True, type=Path)
    ap.add_argument("--pose-dir", required=True, type=Path, help="the export_pose stage's output")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--summary", type=Path, help="write the summary here (DVC metrics)")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "video_skeletons", VideoSkeletonsParams)
        denoise = denoise_mode(args.params)
        summary = run(
            params,
            video_dir=args.video_dir,
            skeleton_dir=args.skeleton_dir,
            pose_dir=args.pose_dir,
            out_dir=args.out_dir,
            summary_path=args.summary,
            denoise=denoise,
        )
    except (ParamsError, ValueError, FileNotFoundError, PoseRuntimeError) as exc:
        print(f"video_skeletons: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k not in ("params", "rejections")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
