"""Training-loader throughput: samples/s with 0, 1 and 2 worker processes.

    python -m benchmarks.loader_throughput [--features-dir data/features] [--batches 120]
        [--baseline-batches 30]

Reads the features store that ``dvc repro`` builds (``make run`` first). For each worker count it
iterates shuffled training batches of the X-Sub split with the train-time augmentation (random
crop-resize to 64 frames, random rotation) and prints samples/s. The baseline, measured in the same
run, is the same dataset reading each sample with its own Zarr call (no shard cache), which is how a
naive Zarr-backed dataset would read; it is timed over fewer batches (``--baseline-batches``, default a
quarter of ``--batches``) since it is an order of magnitude slower. Each measurement gets a fresh
dataset: the loader's workers are forked, and would otherwise inherit the shards the previous
measurement left in the parent's cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stages.dataset import LoaderParams, SkeletonDataset, make_loader
from stages.params import load_section


class PerSampleReads(SkeletonDataset):
    """Baseline: one Zarr read per sample (what the shard cache avoids)."""

    def raw(self, i: int) -> np.ndarray:
        if self._array is None:
            self._array = self._open()
        return self._array[int(self.rows[i]), :, : int(self.lengths[i])].astype(np.float32)

    def _open(self):
        from stages.store import open_store

        return open_store(self.path / "features.zarr", required=(self.source,))[self.source]


def measure(dataset: SkeletonDataset, workers: int, batches: int, batch_size: int) -> float:
    """Samples per second over ``batches`` batches (after a warm-up batch that starts the workers)."""
    loader = make_loader(dataset, batch_size, shuffle=True, num_workers=workers, seed=0, drop_last=True)
    iterator = iter(loader)
    next(iterator)
    count, started = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            x, _ = next(iterator)
        count += x.shape[0]
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features-dir", type=Path, default=Path("data/features"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument(
        "--baseline-batches", type=int, help="batches timed for the baseline (default: --batches / 4, >= 4)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stream", default="joint")
    args = parser.parse_args(argv)
    baseline_batches = max(args.batches // 4, 4) if args.baseline_batches is None else args.baseline_batches
    if args.batches < 1 or baseline_batches < 1 or args.batch_size < 1:
        parser.error("--batches, --baseline-batches and --batch-size must be >= 1")
    store = args.features_dir / "features.zarr"
    if not (store.exists() and (args.features_dir / "samples.parquet").exists()):
        print(f"no features store at {args.features_dir}: run `make run` first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    params = load_section(args.params, "loader", LoaderParams)
    kwargs = dict(stream=args.stream, benchmark="ntu120_xsub", split="train", params=params, train=True)
    try:
        dataset = SkeletonDataset(args.features_dir, **kwargs)
    except ValueError as exc:  # an unknown stream, or one the store lacks
        print(f"loader_throughput: {exc}", file=sys.stderr)
        return 2
    print(
        f"loader: {len(dataset)} training samples, stream {args.stream}, batch {args.batch_size}, "
        f"window {params.window}, {args.batches} batches per measurement "
        f"({baseline_batches} for the baseline)"
    )
    del dataset  # each measurement below opens its own, with an empty shard cache
    baseline = measure(PerSampleReads(args.features_dir, **kwargs), 0, baseline_batches, args.batch_size)
    print(f"  baseline (one Zarr read per sample, 0 workers): {baseline:8.0f} samples/s")
    for workers in (0, 1, 2):
        # A fresh dataset: forked workers would inherit the shards an earlier measurement cached.
        rate = measure(SkeletonDataset(args.features_dir, **kwargs), workers, args.batches, args.batch_size)
        print(
            f"  shard-cached loader, {workers} workers:          {rate:8.0f} samples/s "
            f"({rate / baseline:.1f}x baseline)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
