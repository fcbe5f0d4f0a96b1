"""Throughput and peak memory of the ``parse`` stage against the public reference readers.

The issue's target: at least 10x the per-core throughput (MB/s of ``.skeleton`` text) of the dataset
authors' ``txt2npy.py`` and CTR-GCN's ``get_raw_skes_data.py`` (``benchmarks/reference_readers.py``),
and a peak RSS that stays flat as the corpus grows. Every speed is also printed as a ratio against
the baselines timed in the same run, since these machines are noisy. It measures and prints only.

    python -m benchmarks.parse_throughput --files 2000 [--workers W] [--rss-sizes 1000,20000] [--keep DIR]

The corpus is ~40 distinct realistic files (Kinect-like '%.7g' values, CRLF, 17-digit bodyIDs, 1-2
bodies, 60-200 frames, some empty frames) hard-linked under N NTU file names, so 20,000 files cost
no disk and the page cache holds them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from benchmarks.reference_readers import READERS
from stages.parse import ParseParams, _Settings, process_file, run
from stages.skeleton_text import BodyRecord, format_skeleton, has_native_parser

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = 40
OURS = "ours: process_file (parse+denoise)"
FIRST_BODY_ID = 72057594037927936  # 2**56: real Kinect v2 bodyIDs are 7205759403792xxxx and up
LEAF_JOINTS = (3, 15, 19, 21, 22, 23, 24)  # Kinect reports orientation 0 0 0 0 for these (0-based)
ARM_JOINTS = {5: 0.5, 6: 0.8, 7: 0.9, 21: 1.0, 22: 0.95, 9: 0.5, 10: 0.8, 11: 0.9, 23: 1.0, 24: 0.95}
# A standing person, metres, relative to the spine base; x to the camera's right, y up (0-based NTU order).
REST_POSE = np.array(
    [[0.0, 0.0, 0.0], [0.0, 0.27, -0.01], [0.0, 0.55, -0.02], [0.0, 0.68, -0.03],
     [-0.18, 0.47, -0.02], [-0.24, 0.22, 0.0], [-0.26, -0.01, -0.02], [-0.26, -0.08, -0.03],
     [0.18, 0.47, -0.02], [0.24, 0.22, 0.0], [0.26, -0.01, -0.02], [0.26, -0.08, -0.03],
     [-0.08, -0.06, 0.0], [-0.1, -0.46, 0.02], [-0.1, -0.84, 0.05], [-0.11, -0.89, -0.06],
     [0.08, -0.06, 0.0], [0.1, -0.46, 0.02], [0.1, -0.84, 0.05], [0.11, -0.89, -0.06],
     [0.0, 0.48, -0.02], [-0.26, -0.15, -0.03], [-0.23, -0.1, -0.05], [0.26, -0.15, -0.03],
     [0.23, -0.1, -0.05]]
)  # fmt: skip
DEPTH_CAMERA = (365.0, 256.0, 212.0)  # focal length, centre x, centre y (pixels, 512x424)
COLOR_CAMERA = (1065.0, 960.0, 540.0)  # 1920x1080


# --------------------------------------------------------------------------------------------
# Corpus


def _project(xyz: np.ndarray, camera: tuple[float, float, float]) -> np.ndarray:
    """Pinhole projection of camera-space points ``(..., 3)`` (metres) to pixels ``(..., 2)``."""
    focal, cx, cy = camera
    z = xyz[..., 2]
    return np.stack([cx + focal * xyz[..., 0] / z, cy - focal * xyz[..., 1] / z], axis=-1)


def _person(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """One moving person: Kinect values ``(F, 25, 11)`` and tracking states ``(F, 25)``."""
    t = np.arange(frames)[:, None]
    root = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.35, 0.05), rng.uniform(2.3, 4.2)])
    xyz = np.repeat((REST_POSE * rng.uniform(0.9, 1.1))[None], frames, axis=0)  # F, 25, 3
    speed, amplitude = rng.uniform(0.03, 0.12), rng.uniform(0.05, 0.35)
    for joint, reach in ARM_JOINTS.items():
        swing = amplitude * reach * np.sin(speed * t + rng.uniform(0, np.pi))  # F, 1
        xyz[:, joint, 1] += swing[:, 0]
        xyz[:, joint, 2] -= 0.5 * np.abs(swing[:, 0])
    xyz += root + np.cumsum(rng.normal(0, 0.003, (frames, 1, 3)), axis=0)  # slow drift of the body
    xyz += rng.normal(0, 0.004, xyz.shape)  # Kinect jitter
    quat = rng.normal(0, 1, (1, 25, 4)) + rng.normal(0, 0.05, (frames, 25, 4))
    quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
    quat[:, LEAF_JOINTS] = 0.0
    values = np.concatenate([xyz, _project(xyz, DEPTH_CAMERA), _project(xyz, COLOR_CAMERA), quat], axis=-1)
    tracking = rng.choice([2, 1, 0], p=[0.93, 0.06, 0.01], size=(frames, 25))
    return values, tracking


def _clutter(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A short-lived noise body (furniture, a reflection): wide in x, flat in y."""
    values, tracking = _person(rng, frames)
    values[:, :, 0] = values[:, :1, 0] + rng.uniform(-0.8, 0.8, (frames, 25))
    values[:, :, 1] = values[:, :1, 1] + rng.uniform(-0.1, 0.1, (frames, 25))
    values[:, :, 3:5] = _project(values[:, :, :3], DEPTH_CAMERA)
    values[:, :, 5:7] = _project(values[:, :, :3], COLOR_CAMERA)
    return values, tracking


def _template(rng: np.random.Generator) -> list[list[BodyRecord]]:
    """Frames of body records for one file: one person, two people, or a person plus a noise body."""
    frames = int(rng.integers(60, 201))
    kind = rng.choice(["one", "two", "noise"], p=[0.55, 0.25, 0.2])
    tracks = [(0, frames, _person(rng, frames))]
    if kind == "two":
        tracks.append((0, frames, _person(rng, frames)))
    elif kind == "noise":
        length = int(rng.integers(3, 11))
        start = int(rng.integers(0, frames - length))
        tracks.append((start, start + length, _clutter(rng, length)))
    ids = FIRST_BODY_ID + rng.choice(200_000, size=len(tracks), replace=False)
    empty = set(range(int(rng.integers(0, 6)))) | set(
        rng.integers(0, frames, size=int(rng.integers(0, 4))).tolist()
    )
    out: list[list[BodyRecord]] = []
    for f in range(frames):
        bodies = []
        for body_id, (start, end, (values, tracking)) in zip(ids.tolist(), tracks, strict=True):
            if start <= f < end and f not in empty:
                lean = (float(rng.normal(0, 0.05)), float(rng.normal(0, 0.05)))
                bodies.append(BodyRecord(body_id, values[f - start], tracking[f - start], lean=lean))
        out.append(bodies)
    return out


def ntu_name(i: int) -> str:
    """The i-th distinct NTU sample name: actions vary fastest, then replication, camera, performer, setup."""
    action, rest = i % 120 + 1, i // 120
    replication, rest = rest % 2 + 1, rest // 2
    camera, rest = rest % 3 + 1, rest // 3
    performer, setup = rest % 106 + 1, rest // 106 + 1
    return f"S{setup:03d}C{camera:03d}P{performer:03d}R{replication:03d}A{action:03d}"


def write_templates(folder: Path, count: int = TEMPLATES, seed: int = 0) -> list[Path]:
    """``count`` distinct realistic ``.skeleton`` files (CRLF), written once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"template_{k:03d}.skeleton" for k in range(count)]
    for path in paths:
        frames = _template(rng)  # drawn even when the file exists, so every template stays the same
        if not path.exists():
            path.write_bytes(format_skeleton(frames, "\r\n"))
    return paths


def link_corpus(templates: list[Path], folder: Path, files: int) -> list[Path]:
    """``files`` NTU-named hard links to the templates in ``folder``, made if not already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{ntu_name(i)}.skeleton" for i in range(files)]
    for i, path in enumerate(paths):
        if not path.exists():
            os.link(templates[i % len(templates)], path)
    return paths


def megabytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


# --------------------------------------------------------------------------------------------
# Measurements


def _mib(value_bytes: float) -> float:
    return value_bytes / 2**20


def time_per_file(work: Callable[[Path], object], paths: list[Path]) -> float:
    """Seconds to call ``work`` on every path, in this process."""
    started = time.perf_counter()
    for path in paths:
        work(path)
    return time.perf_counter() - started


def time_readers(paths: list[Path]) -> dict[str, float]:
    """Seconds per reader over ``paths``: the two references, then our per-file work (parse + denoise)."""
    settings = _Settings(
        dataset="synthetic",
        labels={a: a - 1 for a in range(1, 121)},
        missing=frozenset(),
        raw_dir=str(paths[0].parent),
    )
    # This pass also warms ours up (and the page cache for all); the references get one call each.
    accepted = sum(process_file(str(p), settings)[0]["status"] == "accepted" for p in paths)
    if accepted != len(paths):
        print(f"warning: process_file accepted only {accepted} of {len(paths)} files")
    for read in READERS.values():
        read(paths[0])
    seconds = {name: time_per_file(read, paths) for name, read in READERS.items()}
    seconds[OURS] = time_per_file(lambda p: process_file(str(p), settings), paths)
    return seconds


def time_stage(raw_dir: Path, out_dir: Path, workers: int) -> dict:
    """The whole stage in this process (its progress bar silenced); returns its summary."""
    params = dataclasses.replace(ParseParams(), workers=workers)
    with contextlib.redirect_stderr(io.StringIO()):
        summary = run(params, raw_dir=raw_dir, out_dir=out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def stage_child() -> None:
    """Entry point of the fresh process that :func:`measure_rss` starts: run the stage, print JSON."""
    raw_dir, out_dir, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    summary = run(dataclasses.replace(ParseParams(), workers=workers), raw_dir=raw_dir, out_dir=out_dir)
    summary["self_maxrss_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # KiB -> MiB (Linux)
    print(json.dumps(summary))


def _tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """(sum of RSS over the process tree, RSS of the main process, largest RSS of a descendant)."""
    main = proc.memory_info().rss
    others = []
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            others.append(child.memory_info().rss)
    return main + sum(others), main, max(others, default=0)


def measure_rss(raw_dir: Path, out_dir: Path, workers: int, interval: float = 0.05) -> dict:
    """Run the stage in a fresh interpreter and sample its process tree's RSS with psutil.

    Returns the stage summary plus ``tree_peak_mb`` (peak of the summed RSS of the stage process and
    all its descendants: forkserver, pool workers, resource tracker), ``main_peak_mb`` (the stage
    process's own ``ru_maxrss``) and ``worker_peak_mb`` (largest sampled RSS of one descendant).
    """
    code = "from benchmarks.parse_throughput import stage_child; stage_child()"
    args = [sys.executable, "-c", code, str(raw_dir), str(out_dir), str(workers)]
    peaks = [0, 0]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                total, _, worker = _tree_rss(watched)
                peaks = [max(peaks[0], total), max(peaks[1], worker)]
            time.sleep(interval)
        output = proc.stdout.read().decode()
        proc.stdout.close()
        if proc.returncode:
            stderr.seek(0)
            raise RuntimeError(
                f"stage subprocess failed ({proc.returncode}):\n{stderr.read().decode()[-3000:]}"
            )
    shutil.rmtree(out_dir, ignore_errors=True)
    summary = json.loads(output.strip().splitlines()[-1])
    summary.update(tree_peak_mb=_mib(peaks[0]), worker_peak_mb=_mib(peaks[1]))
    summary["main_peak_mb"] = summary.pop("self_maxrss_mb")
    return summary


# --------------------------------------------------------------------------------------------
# Report


def _line(cells: list[str], widths: list[int]) -> str:
    """One table row: the first cell left-aligned, the others right-aligned."""
    first, *rest = cells
    return f"{first:<{widths[0]}s}" + "".join(f"{c:>{w}s}" for c, w in zip(rest, widths[1:], strict=True))


def _ratios(rate: float, baselines: dict[str, float]) -> list[str]:
    return [f"{rate / base:.1f}x" for base in baselines.values()]


def _short(name: str) -> str:
    return name.split()[0]


def print_readers(seconds: dict[str, float], files: int, mb: float) -> dict[str, float]:
    """Print the per-file table; return MB/s (one core) per reader."""
    rates = {name: mb / s for name, s in seconds.items()}
    baselines = {name: rates[name] for name in READERS}
    widths = [38, 10, 11] + [14] * len(baselines)
    print(f"\n== per-file reading in this process, one core ({files} files, {mb:.1f} MB) ==")
    print(_line(["reader", "files/s", "MB/s/core", *[f"vs {_short(n)}" for n in baselines]], widths))
    for name, rate in rates.items():
        print(_line([name, f"{files / seconds[name]:.1f}", f"{rate:.1f}", *_ratios(rate, baselines)], widths))
    return rates


def print_stage(runs: list[dict], baselines: dict[str, float]) -> None:
    """Print the whole-stage table: one row per worker count, ratios per core against the baselines."""
    first = runs[0]
    corpus = f"{first['files']} files ({first['megabytes']:.1f} MB)"
    print(f"\n== whole stage run() over {corpus}, including Zarr + Parquet writing ==")
    widths = [8, 9, 9, 8, 11, 10] + [22] * len(baselines)
    head = ["workers", "seconds", "files/s", "MB/s", "MB/s/core", "speed-up"]
    print(_line(head + [f"per core vs {_short(n)}" for n in baselines], widths))
    for summary in runs:
        seconds, workers = summary["seconds"], summary["workers"]
        rate = summary["megabytes"] / seconds
        cells = [str(workers), f"{seconds:.2f}", f"{summary['files'] / seconds:.1f}", f"{rate:.1f}"]
        cells += [f"{rate / workers:.1f}", f"{first['seconds'] / seconds:.2f}x"]
        print(_line(cells + _ratios(rate / workers, baselines), widths))
    print("accepted per run: " + ", ".join(f"{s['accepted']}/{s['files']}" for s in runs))


def print_rss(results: list[dict]) -> None:
    """Print peak RSS per corpus size and the ratio largest/smallest."""
    print(f"\n== peak RSS of the whole stage in a fresh process (workers={results[0]['workers']}) ==")
    widths = [7, 10, 9, 8, 15, 15, 17]
    head = ["files", "MB text", "seconds", "MB/s", "tree peak MiB", "main peak MiB", "worker peak MiB"]
    print(_line(head, widths))
    for r in results:
        cells = [str(r["files"]), f"{r['megabytes']:.1f}", f"{r['seconds']:.1f}"]
        cells += [f"{r['megabytes'] / r['seconds']:.1f}"]
        cells += [f"{r[k]:.0f}" for k in ("tree_peak_mb", "main_peak_mb", "worker_peak_mb")]
        print(_line(cells, widths))
    if len(results) > 1:
        small, large = results[0], results[-1]
        ratios = [
            f"{k} x{large[f'{k}_peak_mb'] / small[f'{k}_peak_mb']:.2f}" for k in ("tree", "main", "worker")
        ]
        print(f"ratio {large['files']}/{small['files']} files: " + ", ".join(ratios))
    print(
        "tree peak: psutil sampling every 50 ms of the summed RSS of the stage process and all its "
        "descendants\n  (forkserver, pool workers, resource tracker; shared pages count once per process);\n"
        "main peak: the stage process's own getrusage(RUSAGE_SELF).ru_maxrss;\n"
        "worker peak: largest sampled RSS of one descendant."
    )


def print_summary(rates: dict[str, float], runs: list[dict], results: list[dict]) -> None:
    """The final table: every figure as a ratio against the baselines timed in this run."""
    baselines = {name: rates[name] for name in READERS}
    rows = [("per-file parse+denoise", rates[OURS])]
    rows += [
        (f"whole stage, workers={s['workers']}", s["megabytes"] / s["seconds"] / s["workers"]) for s in runs
    ]
    widths = [30, 11] + [14] * len(baselines)
    print("\n== summary: MB/s per core, as a ratio against the references timed in this run ==")
    print(_line(["", "MB/s/core", *[f"vs {_short(n)}" for n in baselines]], widths))
    for label, rate in rows:
        print(_line([label, f"{rate:.1f}", *_ratios(rate, baselines)], widths))
    last = runs[-1]
    speed = f"{last['files'] / last['seconds']:.1f} files/s, {last['megabytes'] / last['seconds']:.1f} MB/s"
    speedup = runs[0]["seconds"] / last["seconds"]
    print(f"all cores (workers={last['workers']}): {speed}, x{speedup:.2f} vs workers=1")
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = large["tree_peak_mb"] / small["tree_peak_mb"]
        print(
            f"peak RSS (process tree) {small['files']} -> {large['files']} files: "
            f"{small['tree_peak_mb']:.0f} -> {large['tree_peak_mb']:.0f} MiB (x{growth:.2f})"
        )


# --------------------------------------------------------------------------------------------
# Command line


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--rss-sizes wants positive integers like 1000,20000; got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="corpus size for the throughput runs")
    parser.add_argument("--workers", type=int, default=0, help="workers of the parallel run (0: all cores)")
    parser.add_argument("--subset", type=int, default=200, help="files timed per-file against the references")
    parser.add_argument("--rss-sizes", type=_sizes, default=[1000, 20000], help="corpus sizes for peak RSS")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the corpus here and keep it")
    args = parser.parse_args(argv)
    if args.files < 1 or args.subset < 1 or args.workers < 0:
        parser.error("--files and --subset must be >= 1 and --workers >= 0")
    return args


def benchmark(args: argparse.Namespace, work: Path) -> None:
    """Build the corpus under ``work``, time the references and the stage, measure peak RSS, print."""
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    templates = write_templates(work / "templates")
    paths = link_corpus(templates, work / f"files-{args.files}", args.files)
    sizes = sorted(p.stat().st_size for p in templates)
    print(f"corpus: {args.files} files, {megabytes(paths):.1f} MB of .skeleton text in {work}")
    kb = f"{sizes[0] / 1e3:.0f}-{sizes[-1] / 1e3:.0f} kB, mean {np.mean(sizes) / 1e3:.0f} kB"
    print(f"  ({len(templates)} distinct files, {kb}, hard-linked under NTU names)")
    print(f"machine: {cores} cores; native parser: {has_native_parser()}; python {sys.version.split()[0]}")

    subset = paths[: args.subset]
    rates = print_readers(time_readers(subset), len(subset), megabytes(subset))
    baselines = {name: rates[name] for name in READERS}

    # Untimed warm-up: the first run() in a process pays one-off set-up (0.1-0.2 s measured here: lazy
    # imports, codec and writer initialisation, the forkserver) that would count against workers=1.
    warm = link_corpus(templates, work / "files-warmup", len(templates))
    for count in dict.fromkeys((1, workers)):
        time_stage(warm[0].parent, work / "out", count)
    runs = [time_stage(paths[0].parent, work / "out", 1)]
    if workers != 1:
        runs.append(time_stage(paths[0].parent, work / "out", workers))
    print_stage(runs, baselines)

    results = []
    for size in args.rss_sizes:
        folder = work / f"files-{size}"
        link_corpus(templates, folder, size)
        results.append(measure_rss(folder, work / "out", workers))
    print_rss(results)
    print_summary(rates, runs, results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="parse-bench-"))
    try:
        benchmark(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
