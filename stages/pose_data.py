"""Stage ``pose_data``: RGB videos + their ``.skeleton`` files -> person crops and targets in Zarr.

``python -m stages.pose_data --params params.yaml --video-dir DIR --skeleton-dir DIR --out-dir DIR``

Any directory of NTU pairs works: ``SsssCcccPpppRrrrAaaa_rgb.avi`` (or ``.mp4``) beside or apart from
``SsssCcccPpppRrrrAaaa.skeleton``. The colour-space joints (``colorX``/``colorY``, in the 1920x1080
colour frame) of each person the denoiser keeps are the 2D labels, scaled to the video's actual size
(so a render smaller than 1920x1080 pairs with the same files); camera-space ``x, y, z`` relative to
the root joint (spine middle) are the 3D labels. Every ``frame_stride``-th frame gives:

- one square crop per person, ``crop_margin`` times the larger side of the person's joint box,
  resized to ``crop_size`` (the keypoint network's input), with the joints in crop pixels;
- the whole frame, resized to ``frame_width`` and letterboxed to a multiple of 32 (the person
  detector's input), with each person's joint box.

A detector frame teaches "no person here" wherever it has no box, so it is kept only when its labels
are complete. A person drawn in it but dropped by ``min_joints`` (mostly outside the frame) always
removes it. The rendered synthetic videos show exactly the bodies of their ``.skeleton`` files, so
there a frame without a body is truly empty and a good negative. A real Kinect misses people who are
in view (the first frames of a take, single lost frames, the second performer of a mutual action for
a while, video frames past the file's end), so with ``--dataset ntu60|ntu120`` a detector frame is
also kept only when it labels as many people as the file's fullest frame, and the pairs in the
official missing-skeleton list are excluded.

Output ``out_dir/pose.zarr`` (sharded along N) and ``out_dir/videos.parquet`` (one row per pair:
split membership, counts, the reason for every rejected pair, and for a used pair with damaged frames
their count: they are skipped, the frames after them keep their labels). Coordinates follow the pixel-centre
convention (pixel ``i`` covers ``[i - 0.5, i + 0.5)``), the one ``cv2.warpAffine`` uses.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm

from models.skeleton import NUM_JOINTS, SPINE_MIDDLE
from stages import ntu_files
from stages.denoise import real_bodies
from stages.errors import RejectedInput
from stages.params import ParamsError, load_section, usable_cpus
from stages.skeleton_text import parse_skeleton
from stages.store import atomic_directory, compressor, write_metrics
from stages.video_frames import FrameCount, read_frames

COLOR_SIZE = (1920, 1080)  # the frame the .skeleton colour coordinates refer to
VIDEO_SUFFIXES = ("_rgb.avi", "_rgb.mp4")
ROOT_JOINT = SPINE_MIDDLE
MAX_PEOPLE = 2  # per frame for the detector targets (NTU has at most two actors)
STORE_LAYOUT = "pose-v1"


@dataclass(frozen=True)
class PoseDataParams:
    """The ``pose_data`` section of params.yaml."""

    frame_stride: int = 3  # every k-th video frame is used
    crop_size: int = 128  # side of the stored person crops (px)
    crop_margin: float = 1.3  # crop side = margin x the larger side of the person's joint box
    frame_width: int = 320  # detector frames: resized to this width, letterboxed to a multiple of 32
    frame_every: int = 4  # every k-th used frame also gives a detector frame (they are 4x a crop's size)
    min_joints: int = 12  # a person needs this many tracked joints inside the frame to be labelled
    max_videos: int = 0  # 0 = every pair found
    workers: int = 0  # 0 = all cores; the output does not depend on it
    shard_samples: int = 1024
    chunk_samples: int = 128
    codec: Literal["lz4", "zstd"] = "lz4"
    compression_level: int = 5

    def validate(self) -> None:
        where = "params.yaml [pose_data]"
        if self.frame_stride < 1 or self.crop_size < 32 or self.crop_size % 32:
            raise ParamsError(f"{where}: frame_stride >= 1 and crop_size a multiple of 32 (>= 32) required")
        if not 1.0 <= self.crop_margin <= 3.0:
            raise ParamsError(f"{where} crop_margin = {self.crop_margin}: must lie in [1, 3]")
        if self.frame_every < 1:
            raise ParamsError(f"{where} frame_every = {self.frame_every}: must be >= 1")
        if self.frame_width < 64 or self.frame_width % 32:
            raise ParamsError(f"{where} frame_width = {self.frame_width}: a multiple of 32, >= 64")
        if not 1 <= self.min_joints <= NUM_JOINTS or self.max_videos < 0 or self.workers < 0:
            raise ParamsError(f"{where}: min_joints in 1-25, max_videos >= 0 and workers >= 0 required")
        if self.shard_samples % self.chunk_samples:
            raise ParamsError(f"{where}: shard_samples must be a multiple of chunk_samples")


# --------------------------------------------------------------------------------------------
# Geometry shared with training and inference


def joint_box(uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Axis-aligned box ``(x0, y0, x1, y1)`` of the valid joints ``uv (25, 2)`` (pixels)."""
    pts = uv[valid]
    return np.concatenate([pts.min(0), pts.max(0)]).astype(np.float32)


def square_crop(box: np.ndarray, margin: float) -> np.ndarray:
    """``(cx, cy, side)`` of the square crop around ``box (x0, y0, x1, y1)``: side = margin x larger side."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0, 8.0) * margin
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, side], dtype=np.float32)


def crop_matrix(crop: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 affine taking image pixels to crop pixels for ``crop (cx, cy, side)`` at ``size``."""
    cx, cy, side = (float(v) for v in crop)
    k = size / side
    return np.array([[k, 0.0, k * (side / 2 - cx)], [0.0, k, k * (side / 2 - cy)]], dtype=np.float64)


def cut_crop(image: np.ndarray, crop: np.ndarray, size: int) -> np.ndarray:
    """``image (H, W, 3)`` uint8 -> the square crop ``(size, size, 3)``, zero outside the image."""
    matrix = crop_matrix(crop, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def letterbox(image: np.ndarray, width: int) -> tuple[np.ndarray, float]:
    """Resize ``image (H, W, 3)`` to ``width`` and pad the bottom to a multiple of 32.

    Returns the frame and the scale (frame pixels per image pixel).
    """
    h, w = image.shape[:2]
    scale = width / w
    height = max(1, round(h * scale))
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    padded_height = -(-height // 32) * 32
    out = np.zeros((padded_height, width, 3), dtype=np.uint8)
    out[:height] = resized
    return out, scale


# --------------------------------------------------------------------------------------------
# Worker side: one (video, skeleton) pair -> rows and arrays


@dataclass(frozen=True)
class Pair:
    name: str
    video: str
    skeleton: str | None


@dataclass(frozen=True)
class LabelRules:
    """What the labels of a dataset promise (see the module docstring)."""

    real: bool = False  # Kinect labels: a frame may miss people who are in view
    missing: frozenset[str] = frozenset()  # the official missing-skeleton list (excluded pairs)

    @classmethod
    def for_dataset(cls, dataset: str) -> LabelRules:
        if dataset == "synthetic":
            return cls()
        return cls(real=True, missing=ntu_files.missing_samples(dataset))


def _people_by_frame(skeleton_bytes: bytes, scale: tuple[float, float]) -> dict[int, list[dict]]:
    """frame -> the people labelled in it: colour joints at the video's scale, camera xyz, tracking."""
    raw = parse_skeleton(skeleton_bytes)
    people: dict[int, list[dict]] = {}
    for records in real_bodies(raw):
        for r in records.tolist():
            uv = raw.colors[r].astype(np.float64) * scale
            people.setdefault(int(raw.frame_index[r]), []).append(
                {"uv": uv, "xyz": raw.joints[r].astype(np.float64), "tracking": raw.tracking[r]}
            )
    return people


def process_pair(
    pair: Pair, params: PoseDataParams, rules: LabelRules = LabelRules()
) -> tuple[dict, dict | None]:
    """One pair -> (table row, arrays or None when rejected or excluded)."""
    row = {"name": pair.name, "video": os.path.basename(pair.video), "status": "ok", "reason": ""}
    if pair.name in rules.missing:
        row.update(status="excluded", reason="missing_list: in the official missing-skeleton list")
        return row, None
    try:
        if pair.skeleton is None:
            raise RejectedInput("no_skeleton", f"no {pair.name}.skeleton beside the skeleton files")
        people = _open_and_label(pair, params, row, rules)
    except RejectedInput as exc:
        row.update(status="rejected", reason=f"{exc.code}: {exc.message}")
        return row, None
    return row, people


def _open_and_label(pair: Pair, params: PoseDataParams, row: dict, rules: LabelRules) -> dict:
    capture = cv2.VideoCapture(pair.video)
    if not capture.isOpened():
        raise RejectedInput("unreadable_video", f"OpenCV cannot open {os.path.basename(pair.video)}")
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width < 32 or height < 32:
            raise RejectedInput("unreadable_video", f"video size {width}x{height} is not a picture")
        scale = (width / COLOR_SIZE[0], height / COLOR_SIZE[1])
        try:
            skeleton = Path(pair.skeleton).read_bytes()
        except OSError as exc:
            raise RejectedInput("unreadable_skeleton", f"cannot read {pair.name}.skeleton: {exc}") from exc
        labels = _people_by_frame(skeleton, scale)
        # Real labels: a frame is complete when it has as many people as the file's fullest frame.
        expected = max(map(len, labels.values()), default=0) if rules.real else 0
        out = _Collector(params, expected)
        count = FrameCount()
        declared = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        # a damaged frame is skipped and the frames after it keep their indices (their labels)
        for index, frame in read_frames(capture, declared, params.frame_stride, count):
            out.add(index, frame, labels.get(index, []))
        row.update(
            width=width,
            height=height,
            frames_used=count.decoded,
            crops=len(out.crops),
            skeleton_frames=max(labels, default=-1) + 1,
        )
        if count.decoded == 0:
            raise RejectedInput("unreadable_video", "no frame could be decoded")
        if count.unreadable:
            row["reason"] = f"unreadable_frames: {count.unreadable} frame(s) could not be decoded; skipped"
        return out.arrays()
    finally:
        capture.release()


class _Collector:
    """Crops and detector frames of one video."""

    def __init__(self, params: PoseDataParams, expected: int = 0):
        self.p = params
        self.expected = expected  # detector frames need this many labelled people (0: any number)
        self.skipped_frames = 0  # detector frames left out because their labels are incomplete
        self.crops, self.uv, self.xyz, self.tracking, self.boxes, self.crop_frames = [], [], [], [], [], []
        self.frames, self.frame_boxes, self.frame_index = [], [], []

    def add(self, index: int, frame: np.ndarray, people: list[dict]) -> None:
        h, w = frame.shape[:2]
        boxes, dropped = [], 0
        for person in people:
            uv, tracking = person["uv"], person["tracking"]
            inside = (uv[:, 0] >= 0) & (uv[:, 0] <= w - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= h - 1)
            valid = inside & (tracking > 0) & np.isfinite(uv).all(1)
            if valid.sum() < self.p.min_joints:
                dropped += 1
                continue
            box = joint_box(uv, valid)
            boxes.append(box)
            crop = square_crop(box, self.p.crop_margin)
            matrix = crop_matrix(crop, self.p.crop_size)
            self.crops.append(cut_crop(frame, crop, self.p.crop_size))
            self.uv.append(uv @ matrix[:, :2].T + matrix[:, 2])
            self.xyz.append(person["xyz"] - person["xyz"][ROOT_JOINT])
            self.tracking.append(np.where(valid, tracking, 0).astype(np.uint8))
            self.boxes.append(crop)
            self.crop_frames.append(index)
        if (index // self.p.frame_stride) % self.p.frame_every:
            return
        if dropped or len(people) < self.expected:  # someone in view has no box: not a clean negative
            self.skipped_frames += 1
            return
        small, scale = letterbox(frame, self.p.frame_width)
        frame_boxes = np.zeros((MAX_PEOPLE, 4), np.float32)
        for k, box in enumerate(sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))[:MAX_PEOPLE]):
            frame_boxes[k] = box * scale
        self.frames.append(small)
        self.frame_boxes.append(frame_boxes)
        self.frame_index.append(index)

    def arrays(self) -> dict:
        n, s = len(self.crops), self.p.crop_size
        return {
            "crops": np.stack(self.crops) if n else np.zeros((0, s, s, 3), np.uint8),
            "joints2d": np.asarray(self.uv, np.float32).reshape(n, NUM_JOINTS, 2),
            "joints3d": np.asarray(self.xyz, np.float32).reshape(n, NUM_JOINTS, 3),
            "tracking": np.asarray(self.tracking, np.uint8).reshape(n, NUM_JOINTS),
            "crop_box": np.asarray(self.boxes, np.float32).reshape(n, 3),
            "crop_frame": np.asarray(self.crop_frames, np.int32),
            "frames": np.stack(self.frames)
            if self.frames
            else np.zeros((0, 32, self.p.frame_width, 3), np.uint8),
            "frame_boxes": np.stack(self.frame_boxes),
            "frame_index": np.asarray(self.frame_index, np.int32),
            "skipped_frames": self.skipped_frames,
        }


def _process(job: tuple[Pair, PoseDataParams, LabelRules]) -> tuple[dict, dict | None]:
    cv2.setNumThreads(1)
    return process_pair(*job)


# --------------------------------------------------------------------------------------------
# Writer side


class _Appender:
    """Appends rows to growable sharded arrays, one whole shard per write."""

    def __init__(self, group: zarr.Group, name: str, tail: tuple[int, ...], dtype, params: PoseDataParams):
        self.array = group.create_array(
            name,
            shape=(0, *tail),
            dtype=dtype,
            chunks=(params.chunk_samples, *tail),
            shards=(params.shard_samples, *tail),
            compressors=compressor(params.codec, params.compression_level),
            fill_value=0,
        )
        self.shard, self.pending, self.count = params.shard_samples, [], 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        if sum(len(p) for p in self.pending) >= self.shard:
            self._write(final=False)

    def close(self) -> None:
        self._write(final=True)

    def _write(self, final: bool) -> None:
        block = np.concatenate(self.pending) if self.pending else np.zeros((0, *self.array.shape[1:]))
        keep = len(block) if final else len(block) // self.shard * self.shard
        if keep:
            self.array.resize((self.count + keep, *self.array.shape[1:]))
            self.array[self.count : self.count + keep] = block[:keep]
            self.count += keep
        self.pending = [block[keep:]] if keep < len(block) else []


def discover_pairs(video_dir: Path, skeleton_dir: Path) -> list[Pair]:
    """Every NTU-named video under ``video_dir`` with its ``.skeleton`` (or None) from ``skeleton_dir``."""
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video directory {video_dir} does not exist or is not a directory")
    skeletons = (
        {p.stem: str(p) for p in Path(skeleton_dir).rglob("*") if p.name.lower().endswith(".skeleton")}
        if skeleton_dir
        else {}
    )
    pairs = []
    for path in sorted(video_dir.rglob("*"), key=lambda p: p.name):
        suffix = next((s for s in VIDEO_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[: -len(suffix)]
        pairs.append(Pair(name, str(path), skeletons.get(name)))
    return pairs


TABLE = pa.schema(
    [
        ("name", pa.string()),
        ("video", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("index", pa.int32()),
        ("performer", pa.int16()),
        ("setup", pa.int16()),
        ("camera", pa.int16()),
        ("action", pa.int16()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("frames_used", pa.int32()),
        ("skeleton_frames", pa.int32()),
        ("crops", pa.int32()),
        *[(b, pa.string()) for b in ntu_files.BENCHMARKS],
    ]
)


def run(
    params: PoseDataParams, *, video_dir: Path, skeleton_dir: Path, out_dir: Path, dataset: str = "synthetic"
) -> dict:
    """Extract crops and detector frames from every pair into ``out_dir``; return a summary.

    ``dataset`` (``synthetic`` | ``ntu60`` | ``ntu120``) says what the labels promise: see the
    module docstring and :class:`LabelRules`.
    """
    start = time.perf_counter()
    rules = LabelRules.for_dataset(dataset)
    pairs = discover_pairs(Path(video_dir), Path(skeleton_dir))
    if params.max_videos:
        pairs = pairs[: params.max_videos]
    rows: list[dict] = []
    s, hf, skipped = params.crop_size, None, 0
    with atomic_directory(Path(out_dir)) as tmp:
        group = zarr.open_group(str(tmp / "pose.zarr"), mode="w")
        crops = {
            "crops": _Appender(group, "crops", (s, s, 3), np.uint8, params),
            "joints2d": _Appender(group, "joints2d", (NUM_JOINTS, 2), np.float32, params),
            "joints3d": _Appender(group, "joints3d", (NUM_JOINTS, 3), np.float32, params),
            "tracking": _Appender(group, "tracking", (NUM_JOINTS,), np.uint8, params),
            "crop_box": _Appender(group, "crop_box", (3,), np.float32, params),
            "crop_video": _Appender(group, "crop_video", (), np.int32, params),
            "crop_frame": _Appender(group, "crop_frame", (), np.int32, params),
        }
        frames: dict[str, _Appender] = {}
        for row, arrays in tqdm(
            _results(pairs, params, rules), total=len(pairs), desc="pose_data", unit="video"
        ):
            _describe(row, len(rows))
            rows.append(row)
            if arrays is None or row["status"] != "ok":  # e.g. a video whose name is not NTU's
                continue
            if not frames and len(arrays["frames"]):
                hf = arrays["frames"].shape[1]
                frames = {
                    "frames": _Appender(group, "frames", (hf, params.frame_width, 3), np.uint8, params),
                    "frame_boxes": _Appender(group, "frame_boxes", (MAX_PEOPLE, 4), np.float32, params),
                    "frame_video": _Appender(group, "frame_video", (), np.int32, params),
                    "frame_index": _Appender(group, "frame_index", (), np.int32, params),
                }
            if len(arrays["frames"]) and arrays["frames"].shape[1] != hf:
                row.update(
                    status="rejected",
                    reason=f"aspect_ratio: frames {arrays['frames'].shape[1]} px "
                    f"high after letterboxing, the first video's are {hf}: mixed aspect ratios",
                )
                continue
            skipped += arrays["skipped_frames"]
            video = np.full(len(arrays["crops"]), row["index"], np.int32)
            arrays["crop_video"] = video
            for key, appender in crops.items():
                appender.add(arrays[key])
            arrays["frame_video"] = np.full(len(arrays["frames"]), row["index"], np.int32)
            for key, appender in frames.items() if len(arrays["frames"]) else ():
                appender.add(arrays[key])
        for appender in (*crops.values(), *frames.values()):
            appender.close()
        ok = [r for r in rows if r["status"] == "ok"]
        group.attrs.update(
            layout=STORE_LAYOUT,
            joints=NUM_JOINTS,
            root_joint=ROOT_JOINT,
            crop_size=s,
            frame_width=params.frame_width,
            frame_height=hf or 0,
            units_3d="m, camera space minus the root",
            pixel_convention="centre",
            params=asdict(params),
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=TABLE), tmp / "videos.parquet")
        summary = {
            "videos": len(rows),
            "videos_ok": len(ok),
            "rejected": {r["name"]: r["reason"] for r in rows if r["status"] != "ok"},
            "crops": crops["crops"].count,
            "frames": frames["frames"].count if frames else 0,
            "frames_skipped": skipped,  # detector frames whose labels miss someone in view
            "labels": "kinect" if rules.real else "complete",
            "crops_by_split": _by_split(rows, "ntu120_xsub"),
        }
        if not ok:
            raise RejectedInput(
                "no_usable_video",
                f"none of the {len(rows)} video/skeleton pairs in "
                f"{video_dir} could be used: {summary['rejected']}",
            )
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _describe(row: dict, index: int) -> None:
    row["index"] = index
    try:
        sample = ntu_files.parse_name(row["name"])
    except ValueError as exc:
        row.update(status="rejected", reason=f"bad_name: {exc}")
        return
    row.update(performer=sample.performer, setup=sample.setup, camera=sample.camera, action=sample.action)
    row.update(ntu_files.split_membership(sample))


def _by_split(rows: list[dict], benchmark: str) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        if r["status"] == "ok":
            out[r[benchmark]] = out.get(r[benchmark], 0) + r.get("crops", 0)
    return out


def _results(
    pairs: list[Pair], params: PoseDataParams, rules: LabelRules
) -> Iterator[tuple[dict, dict | None]]:
    workers = params.workers or usable_cpus()
    jobs = [(pair, params, rules) for pair in pairs]
    if workers == 1 or len(jobs) <= 1:
        yield from map(_process, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process, jobs, chunksize=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--video-dir", type=Path, required=True, help="directory of *_rgb.avi / *_rgb.mp4")
    parser.add_argument("--skeleton-dir", type=Path, required=True, help="directory of the .skeleton files")
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory (replaced)")
    parser.add_argument("--summary", type=Path, help="write the summary here as JSON (DVC metrics)")
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "ntu60", "ntu120"),
        default="synthetic",
        help="what the labels promise (parse.dataset): real Kinect files miss people in view",
    )
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "pose_data", PoseDataParams)
        summary = run(
            params,
            video_dir=args.video_dir,
            skeleton_dir=args.skeleton_dir,
            out_dir=args.out_dir,
            dataset=args.dataset,
        )
    except (ParamsError, FileNotFoundError) as exc:
        print(f"pose_data: error: {exc}", file=sys.stderr)
        return 2
    except RejectedInput as exc:
        print(f"pose_data: error: {exc.message}", file=sys.stderr)
        return 1
    if args.summary:
        write_metrics(args.summary, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "rejected"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
