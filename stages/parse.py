"""Stage ``parse``: a directory of ``.skeleton`` files -> ``skeletons.zarr`` + ``samples.parquet``.

Files are parsed and denoised in parallel worker processes (the compiled parser, then
:mod:`stages.denoise`); the main process streams the accepted samples into a sharded Zarr store,
one shard at a time, and the per-file table into Parquet, one row group per block, so peak memory
does not grow with the number of files. Every input file gets a row: ``accepted``, ``rejected``
(malformed or unusable, with the reason) or ``excluded`` (official missing list, class not
selected). A bad file never stops the stage.

    python -m stages.parse --raw-dir DIR --out-dir DIR [--workers N] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import array as arraylib
import collections
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm

from models.skeleton import MAX_COORDINATE_M
from stages import ntu_files
from stages.denoise import COMPLETE, DENOISE_MODES, DenoiseError, select_actors
from stages.params import ParamsError, load_section, usable_cpus
from stages.skeleton_text import SkeletonFormatError, has_native_parser, parse_skeleton
from stages.store import FORMAT_VERSION, LAYOUT, atomic_directory, create_tensor, write_metrics, write_vector

FILES_PER_TASK = 8


@dataclass(frozen=True)
class ParseParams:
    """The ``parse`` section of params.yaml."""

    dataset: Literal["synthetic", "ntu60", "ntu120"] = "synthetic"
    # "present": the actions the directory's file names hold (the synthetic corpus's own classes,
    # whatever `-S synthesize.classes=...` made); "all": 1-120 (1-60 for ntu60); or a list of ids
    classes: Literal["all", "present"] | tuple[int, ...] = "all"
    workers: int = 0  # 0: one per core but one, which the writer needs (so inline on 2 cores)
    # Store order: "shuffled" (seeded) mixes setups, cameras and performers within every shard, so
    # the loader's shard-grouped shuffling still gives diverse batches; "name" keeps file-name order.
    order: Literal["shuffled", "name"] = "shuffled"
    seed: int = 0
    max_frames: int = 300  # T of the store; longer samples grow it in steps of this size
    shard_samples: int = 256
    chunk_samples: int = 64
    codec: Literal["lz4", "zstd"] = "lz4"
    compression_level: int = 5
    # "complete": a second person whose Kinect id changes mid-sequence keeps both halves; "reference":
    # CTR-GCN's get_raw_denoised_data.py frame for frame, which can drop the earlier half then.
    denoise: Literal["complete", "reference"] = "complete"

    def validate(self) -> None:
        if self.denoise not in DENOISE_MODES:
            raise ParamsError(f"params.yaml [parse] denoise: one of {DENOISE_MODES}, got {self.denoise!r}")
        if self.classes not in ("all", "present"):
            bad = [c for c in self.classes if not 1 <= c <= ntu_files.NTU120_MAX_ACTION]
            if bad or len(set(self.classes)) != len(self.classes) or not self.classes:
                raise ParamsError(f"params.yaml [parse] classes: ids must be distinct, in 1-120; got {bad}")
        if self.workers < 0 or self.max_frames < 1 or self.shard_samples % self.chunk_samples:
            raise ParamsError(
                "params.yaml [parse]: workers >= 0, max_frames >= 1 and shard_samples a multiple of "
                "chunk_samples are required"
            )

    def class_ids(self, present: Iterable[int] = ()) -> tuple[int, ...]:
        """The selected NTU action ids (1-based); label = position in this tuple. ``present``: the
        action ids of the files found, for ``classes: present``."""
        top = ntu_files.NTU60_MAX_ACTION if self.dataset == "ntu60" else ntu_files.NTU120_MAX_ACTION
        if self.classes == "present":
            return tuple(sorted({a for a in present if 1 <= a <= top}))
        if self.classes != "all":
            return tuple(sorted(self.classes))
        return tuple(range(1, top + 1))


SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("file", pa.string()),
        ("file_bytes", pa.int64()),
        ("setup", pa.int16()),
        ("camera", pa.int16()),
        ("performer", pa.int16()),
        ("replication", pa.int16()),
        ("action", pa.int16()),
        ("label", pa.int32()),
        ("status", pa.string()),
        ("reason_code", pa.string()),
        ("reason", pa.string()),
        ("raw_frames", pa.int32()),
        ("body_frames", pa.int32()),
        ("kept_frames", pa.int32()),
        ("bodies_seen", pa.int32()),
        ("actors_kept", pa.int32()),
        ("dropped_by_length", pa.int32()),
        ("dropped_by_spread", pa.int32()),
        ("dropped_by_overlap", pa.int32()),
        ("index", pa.int64()),
        *[(benchmark, pa.string()) for benchmark in ntu_files.BENCHMARKS],
    ]
)

# --------------------------------------------------------------------------------------------
# Worker side: one file -> (row, joints, colors)


@dataclass(frozen=True)
class _Settings:
    dataset: str
    labels: dict[int, int]  # action id -> 0-based label
    missing: frozenset[str]
    raw_dir: str
    denoise: str = COMPLETE  # one of stages.denoise.DENOISE_MODES


_settings: _Settings | None = None


def _init_worker(settings: _Settings) -> None:
    global _settings
    _settings = settings


def _reject(row: dict, status: str, code: str, reason: str) -> tuple[dict, None, None]:
    row.update(status=status, reason_code=code, reason=reason)
    return row, None, None


def _printable(name: str) -> str:
    """``name`` as the table can hold it: a file system name that is not valid UTF-8 (Python keeps its
    bytes as surrogates, which Parquet cannot store) with those bytes as ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def process_file(path: str, settings: _Settings) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """Parse and denoise one file. Returns its table row and, if accepted, float32 joints
    ``(3, T, 25, 2)`` and colour pixels ``(2, T, 25, 2)``. Never raises for bad input.

    The row's ``name`` and ``file`` are :func:`_printable`; a file whose own name is not valid UTF-8
    is rejected (``bad_name``), one in a directory whose name is not is read as any other."""
    file = Path(path)
    stem = file.name[: -len(".skeleton")]
    row: dict = {
        "name": _printable(stem),
        "file": _printable(os.path.relpath(file, settings.raw_dir)),
        "index": -1,
    }
    try:
        row["file_bytes"] = file.stat().st_size
        if row["name"] != stem:
            raise ValueError(f"file name '{row['name']}' is not valid UTF-8 (its bytes shown as \\xNN)")
        sample = ntu_files.parse_name(stem)
    except (ValueError, OSError) as exc:
        return _reject(row, "rejected", "bad_name" if isinstance(exc, ValueError) else "unreadable", str(exc))
    row.update(asdict(sample), **ntu_files.split_membership(sample))
    if stem in settings.missing:
        return _reject(
            row, "excluded", "missing_list", f"in the official {settings.dataset} missing-skeleton list"
        )
    if settings.dataset == "ntu60" and not ntu_files.is_ntu60(sample):
        return _reject(
            row, "excluded", "not_in_dataset", "not part of NTU RGB+D 60 (setup > 17 or action > 60)"
        )
    if sample.action not in settings.labels:
        return _reject(row, "excluded", "class_not_selected", f"action A{sample.action:03d} is not selected")
    row["label"] = settings.labels[sample.action]
    try:
        data = file.read_bytes()
        raw = parse_skeleton(data)
    except OSError as exc:
        return _reject(row, "rejected", "unreadable", f"cannot read file: {exc}")
    except SkeletonFormatError as exc:
        return _reject(row, "rejected", exc.code, exc.message)
    row["raw_frames"] = raw.declared_frames
    row["body_frames"] = int(np.count_nonzero(raw.body_counts))
    try:
        chosen = select_actors(raw, settings.denoise)
    except DenoiseError as exc:
        row["bodies_seen"] = len(np.unique(raw.body_ids))
        return _reject(row, "rejected", exc.code, exc.message)
    except Exception as exc:  # a bug must not stop the stage or lose the other files: record it
        return _reject(row, "rejected", "internal_error", f"{type(exc).__name__}: {exc} (please report)")
    farthest = float(np.abs(chosen.joints).max())  # the bodies denoising dropped may hold anything
    if farthest > MAX_COORDINATE_M:
        return _reject(
            row, "rejected", "out_of_range",
            f"a kept joint is {farthest:.3g} m from the camera; at most {MAX_COORDINATE_M:g} m",
        )  # fmt: skip
    row.update(
        status="accepted",
        kept_frames=chosen.joints.shape[1],
        bodies_seen=chosen.bodies_seen,
        actors_kept=chosen.actors_kept,
        dropped_by_length=chosen.dropped_by_length,
        dropped_by_spread=chosen.dropped_by_spread,
        dropped_by_overlap=chosen.dropped_by_overlap,
    )
    return row, chosen.joints, chosen.colors


def _process_batch(paths: tuple[str, ...]) -> list[tuple[dict, np.ndarray | None, np.ndarray | None]]:
    assert _settings is not None, "worker not initialised"
    return [process_file(p, _settings) for p in paths]


# --------------------------------------------------------------------------------------------
# Main process: bounded fan-out, one writer


class _ShardWriter:
    """Collects accepted samples shard by shard into Zarr.

    A full shard is handed to a background thread that compresses and appends it while the next one
    fills (two buffer sets: at most one shard is in flight, so memory stays bounded), so collecting
    results from the workers never waits on compression.
    """

    def __init__(self, group: zarr.Group, params: ParseParams):
        self.params = params
        self.frames = params.max_frames
        common = dict(
            frames=self.frames,
            dtype="float32",
            shard_samples=params.shard_samples,
            chunk_samples=params.chunk_samples,
            codec=params.codec,
            level=params.compression_level,
        )
        self.arrays = {
            "joints": create_tensor(group, "joints", channels=3, **common),
            "colors": create_tensor(group, "colors", channels=2, **common),
        }
        self.buffers = self._buffers()
        self._spare: dict[str, np.ndarray] | None = None
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.fill = 0
        self.written = 0
        self.lengths = arraylib.array("i")  # 4 bytes a sample, not a Python int each
        self.labels = arraylib.array("i")

    def _buffers(self) -> dict[str, np.ndarray]:
        shape = (self.params.shard_samples, self.frames, 25, 2)
        return {
            name: np.zeros((shape[0], array.shape[1], *shape[1:]), dtype=np.float32)
            for name, array in self.arrays.items()
        }

    def _wait(self) -> None:
        if self._pending is not None:
            spare, self._pending = self._pending.result(), None  # re-raises a failed write
            self._spare = spare if spare["joints"].shape[2] == self.frames else None

    def _grow(self, length: int) -> None:
        self._wait()
        old, self.frames = self.frames, -(-length // self.params.max_frames) * self.params.max_frames
        for array in self.arrays.values():
            array.resize((array.shape[0], array.shape[1], self.frames, *array.shape[3:]))
        grown = self._buffers()
        for name, buffer in grown.items():
            buffer[:, :, :old] = self.buffers[name]
        self.buffers, self._spare = grown, None

    def add(self, label: int, joints: np.ndarray, colors: np.ndarray) -> int:
        length = joints.shape[1]
        if length > self.frames:
            self._grow(length)
        self.buffers["joints"][self.fill, :, :length] = joints
        self.buffers["colors"][self.fill, :, :length] = colors
        self.lengths.append(length)
        self.labels.append(label)
        index = self.written + self.fill
        self.fill += 1
        if self.fill == self.params.shard_samples:
            self.flush()
        return index

    def flush(self) -> None:
        """Hand the samples buffered so far to the writer thread."""
        if not self.fill:
            return
        self._wait()
        start, end = self.written, self.written + self.fill
        self._pending = self._executor.submit(self._write, self.buffers, start, end)
        self.buffers = self._spare if self._spare is not None else self._buffers()
        self._spare = None
        self.written, self.fill = end, 0

    def _write(self, buffers: dict[str, np.ndarray], start: int, end: int) -> dict[str, np.ndarray]:
        for name, array in self.arrays.items():
            array.resize((end, *array.shape[1:]))
            array[start:end] = buffers[name][: end - start]
            buffers[name][: end - start] = 0
        return buffers

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On success write what is left; on failure just stop the writer thread."""
        try:
            if exc_type is None:
                self.flush()
                self._wait()
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _batched(items, size: int):
    iterator = iter(items)
    while batch := tuple(islice(iterator, size)):
        yield batch


def denoise_mode(params_path: str | Path) -> str:
    """``parse.denoise`` of the params file at ``params_path`` (the default when it has no [parse]
    section), for the stages that read ``.skeleton`` files or bundle the model as parse would."""
    return load_section(params_path, "parse", ParseParams, missing_ok=True).denoise


def _actions(paths: list[str], missing: frozenset[str]) -> set[int]:
    """The action ids in the names of ``paths`` (a file with another name is rejected later, and one
    on the dataset's official ``missing`` list is excluded, so neither makes a class)."""
    found = set()
    for path in paths:
        stem = Path(path).name[: -len(".skeleton")]
        with contextlib.suppress(ValueError):
            if stem not in missing:
                found.add(ntu_files.parse_name(stem).action)
    return found


def discover(raw_dir: Path) -> list[str]:
    """All ``*.skeleton`` files under ``raw_dir`` (recursively; the extension in any case, as a copy
    from a case-insensitive file system may spell it), sorted by file name then path.

    Plain strings, not ``Path`` objects: for 100k+ files the list is a tenth of the memory.
    """
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw directory {raw_dir} does not exist or is not a directory")
    found = [
        (name, os.path.join(root, name))
        for root, _, names in os.walk(raw_dir)
        for name in names
        if name.lower().endswith(".skeleton")
    ]
    found.sort()
    return [path for _, path in found]


def _results(paths: list[str], settings: _Settings, workers: int):
    """Yield per-file results in input order, with at most a few tasks in flight per worker."""
    batches = _batched(paths, FILES_PER_TASK)
    if workers == 1:
        _init_worker(settings)
        for batch in batches:
            yield from _process_batch(batch)
        return
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_process_batch, (batch,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


@dataclass
class _Tally:
    statuses: collections.Counter
    reasons: collections.Counter
    bytes: int = 0


# What parsing and denoising put in a row: a duplicate's row keeps none of it (the file is not used).
_PROCESSED = (
    "label", "raw_frames", "body_frames", "kept_frames", "bodies_seen", "actors_kept",
    "dropped_by_length", "dropped_by_spread", "dropped_by_overlap",
)  # fmt: skip


def _duplicate(row: dict) -> tuple[dict, None, None]:
    for column in _PROCESSED:
        row.pop(column, None)
    return _reject(row, "rejected", "duplicate", "another file has this name")


def _collect(results, writer: _ShardWriter, table_path: Path, total: int) -> _Tally:
    """Write each result: tensors to the shard writer, rows to Parquet (one row group per 1024)."""
    tally = _Tally(collections.Counter(), collections.Counter())
    seen: set[str] = set()
    rows: list[dict] = []
    with pq.ParquetWriter(table_path, SCHEMA) as table:
        for row, joints, colors in tqdm(results, total=total, desc="parse", unit="file", mininterval=1.0):
            tally.bytes += row.get("file_bytes") or 0
            if row["status"] != "rejected":  # a rejected copy (truncated, say) leaves the name to a good one
                if row["name"] in seen:
                    row, joints, colors = _duplicate(row)
                seen.add(row["name"])
            if joints is not None:
                row["index"] = writer.add(row["label"], joints, colors)
            tally.statuses[row["status"]] += 1
            if row["status"] != "accepted":
                tally.reasons[f"{row['status']}:{row['reason_code']}"] += 1
            rows.append(row)
            if len(rows) >= 1024:
                table.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
                rows.clear()
        if rows:
            table.write_batch(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    return tally


def run(params: ParseParams, *, raw_dir: Path, out_dir: Path, summary_path: Path | None = None) -> dict:
    """Parse every ``.skeleton`` file under ``raw_dir`` into ``out_dir``; return the summary.

    Files are processed (and stored) in ``params.order``; rows of the table follow the same order.
    """
    params.validate()  # params built in code have not been through load_section's checks
    started = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    paths = discover(raw_dir)
    if not paths:
        raise FileNotFoundError(f"no .skeleton files under {raw_dir}")
    if params.order == "shuffled":
        paths = [paths[i] for i in np.random.default_rng(params.seed).permutation(len(paths))]
    missing = ntu_files.missing_samples(params.dataset) if params.dataset != "synthetic" else frozenset()
    class_ids = params.class_ids(_actions(paths, missing) if params.classes == "present" else ())
    if not class_ids:
        raise ParamsError(
            f"params.yaml [parse] classes: present, but no file under {raw_dir} has an NTU name"
        )
    settings = _Settings(
        dataset=params.dataset,
        labels={action: label for label, action in enumerate(class_ids)},
        missing=missing,
        raw_dir=str(raw_dir),
        denoise=params.denoise,
    )
    workers = params.workers or max(usable_cpus() - 1, 1)
    with atomic_directory(out_dir) as tmp:
        group = zarr.open_group(str(tmp / "skeletons.zarr"), mode="w")
        with _ShardWriter(group, params) as writer:
            tally = _collect(_results(paths, settings, workers), writer, tmp / "samples.parquet", len(paths))
        write_vector(group, "lengths", np.frombuffer(writer.lengths, dtype=np.int32))
        write_vector(group, "labels", np.frombuffer(writer.labels, dtype=np.int32))
        names = ntu_files.class_names()
        group.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "layout": LAYOUT,
                "joints": "ntu25 (Kinect v2), 0-based, see models/skeleton.py",
                "units": {
                    "joints": "metres, Kinect camera space",
                    "colors": "pixels, 1920x1080 colour frame",
                },
                "dataset": params.dataset,
                "class_ids": list(class_ids),
                "class_names": [names[c] for c in class_ids],
                "max_frames": writer.frames,
                # the denoising mode, when not the default (default stores stay as they were); the
                # features stage copies it, evaluate's model.pt carries it and export checks it
                **({"denoise": params.denoise} if params.denoise != COMPLETE else {}),
            }
        )
    seconds = time.perf_counter() - started
    summary = {
        "files": len(paths),
        "accepted": tally.statuses["accepted"],
        "rejected": tally.statuses["rejected"],
        "excluded": tally.statuses["excluded"],
        "by_reason": dict(sorted(tally.reasons.items())),
        "max_frames": writer.frames,
        "mean_kept_frames": float(np.mean(writer.lengths)) if writer.lengths else 0.0,
        "megabytes": round(tally.bytes / 1e6, 3),
        "seconds": round(seconds, 3),
        "workers": workers,
        "native_parser": has_native_parser(),
    }
    if summary_path is not None:
        write_metrics(summary_path, summary)
    return summary


def print_summary(summary: dict) -> None:
    files, seconds = summary["files"], summary["seconds"]
    print(
        f"parse: {files} files ({summary['megabytes']:.1f} MB) in {seconds:.1f} s "
        f"({files / seconds:.0f} files/s, {summary['megabytes'] / seconds:.1f} MB/s, "
        f"{summary['workers']} workers)"
    )
    print(f"  accepted {summary['accepted']}, rejected {summary['rejected']}, excluded {summary['excluded']}")
    for reason, count in summary["by_reason"].items():
        print(f"    {reason:<36} {count}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw-dir", type=Path, required=True, help="directory of .skeleton files")
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file ([parse] section)"
    )
    parser.add_argument("--workers", type=int, help="override parse.workers (0 = one per core)")
    parser.add_argument("--summary", type=Path, help="write the summary JSON (DVC metrics) here")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "parse", ParseParams)
        if args.workers is not None:
            params = ParseParams(**{**asdict(params), "workers": args.workers})
            params.validate()
        summary = run(params, raw_dir=args.raw_dir, out_dir=args.out_dir, summary_path=args.summary)
    except (ParamsError, FileNotFoundError) as exc:
        print(f"parse: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
