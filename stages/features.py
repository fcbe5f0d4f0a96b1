"""Stage ``features``: normalised joint, bone, joint-motion and bone-motion streams.

Reads the parse output (``skeletons.zarr`` + ``samples.parquet``) one shard-sized block at a time,
centres every sample on actor 1's spine-middle joint of its first frame (optionally aligns the view),
derives the streams with :mod:`models.features` (the same code training, export and serving use) and
writes ``features.zarr`` (one array per stream, same layout and lengths) plus ``samples.parquet``
(the accepted samples, ``index`` = row in the store).

Storage dtype ``float16`` (the default) halves the disk and the loader's decoding: it rounds by at
most half its spacing, 2^-11 relative (0.25 mm at 0.5-1 m, 0.5 mm at 1-2 m, 1 mm at 2-4 m from the
origin), below Kinect's own noise; the stage reports the largest rounding error it made.

    python -m stages.features --in-dir data/parsed --out-dir data/features [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm

from models import features
from stages.params import ParamsError, load_section
from stages.store import (
    ContractError,
    atomic_directory,
    create_tensor,
    open_store,
    write_metrics,
    write_vector,
)


@dataclass(frozen=True)
class FeaturesParams:
    """The ``features`` section of params.yaml."""

    streams: tuple[str, ...] = features.STREAMS
    dtype: Literal["float32", "float16"] = "float16"
    view_align: bool = False
    shard_samples: int = 256
    chunk_samples: int = 64
    codec: Literal["lz4", "zstd"] = "lz4"
    compression_level: int = 5

    def validate(self) -> None:
        unknown = [s for s in self.streams if s not in features.STREAMS]
        if unknown or not self.streams:
            raise ParamsError(
                f"params.yaml [features] streams: unknown {unknown}; valid: {', '.join(features.STREAMS)}"
            )
        if "joint" not in self.streams:
            raise ParamsError(
                "params.yaml [features] streams: 'joint' is required (other streams derive from it)"
            )
        if self.shard_samples % self.chunk_samples:
            raise ParamsError("params.yaml [features]: shard_samples must be a multiple of chunk_samples")


def normalise(joints: np.ndarray, view_align: bool) -> np.ndarray:
    """The pipeline's normalisation of raw camera-space joints ``(N, 3, T, 25, 2)`` (also used by serving)."""
    out = features.centre(joints)
    return features.align_view(out) if view_align else out


def _write_block(arrays: dict, streams: dict[str, np.ndarray], start: int, end: int) -> None:
    for name, values in streams.items():
        arrays[name][start:end] = values


def run(params: FeaturesParams, *, in_dir: Path, out_dir: Path, summary_path: Path | None = None) -> dict:
    """Build the feature store in ``out_dir`` from the parse output in ``in_dir``; return the summary."""
    started = time.perf_counter()
    source = open_store(Path(in_dir) / "skeletons.zarr", required=("joints",))
    joints, lengths, labels = source["joints"], source["lengths"][:], source["labels"][:]
    n, _, frames = joints.shape[:3]
    table = pq.read_table(Path(in_dir) / "samples.parquet")
    accepted = table.filter(pc.equal(table["status"], "accepted")).sort_by("index")
    if accepted.num_rows != n or not np.array_equal(accepted["index"].to_numpy(), np.arange(n)):
        raise ContractError(
            f"{in_dir}: samples.parquet lists {accepted.num_rows} accepted samples, store has {n}"
        )
    max_error = dict.fromkeys(params.streams, 0.0)
    with atomic_directory(Path(out_dir)) as tmp:
        group = zarr.open_group(str(tmp / "features.zarr"), mode="w")
        arrays = {
            name: create_tensor(
                group,
                name,
                channels=3,
                frames=frames,
                dtype=params.dtype,
                shard_samples=params.shard_samples,
                chunk_samples=params.chunk_samples,
                codec=params.codec,
                level=params.compression_level,
                num_samples=n,
            )
            for name in params.streams
        }
        # One shard-sized block at a time; a background thread writes block k while block k+1 is
        # computed (at most one block in flight, so memory stays bounded).
        with ThreadPoolExecutor(1, thread_name_prefix="features-writer") as writer:
            pending = None
            for start in tqdm(range(0, n, params.shard_samples), desc="features", unit="shard"):
                end = min(start + params.shard_samples, n)
                block = normalise(joints[start:end], params.view_align)
                streams = {}
                for name, values in features.streams(block, params.streams, lengths[start:end]).items():
                    streams[name] = values.astype(params.dtype, copy=False)
                    if params.dtype != "float32":
                        err = float(np.max(np.abs(streams[name].astype(np.float32) - values), initial=0.0))
                        max_error[name] = max(max_error[name], err)
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_block, arrays, streams, start, end)
            if pending is not None:
                pending.result()
        write_vector(group, "lengths", lengths.astype(np.int32))
        write_vector(group, "labels", labels.astype(np.int32))
        group.attrs.update(
            {
                **dict(source.attrs),
                "streams": list(params.streams),
                "dtype": params.dtype,
                "normalisation": {
                    "centre": "actor 1 spine-middle, first frame",
                    "view_align": params.view_align,
                },
            }
        )
        pq.write_table(accepted, tmp / "samples.parquet")
    summary = {
        "samples": n,
        "streams": list(params.streams),
        "dtype": params.dtype,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if params.dtype != "float32":
        summary["max_abs_rounding_error_m"] = {k: round(v, 6) for k, v in max_error.items()}
    if summary_path is not None:
        write_metrics(summary_path, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in-dir", type=Path, required=True, help="parse output directory")
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--summary", type=Path, help="write the summary JSON (DVC metrics) here")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "features", FeaturesParams)
        summary = run(params, in_dir=args.in_dir, out_dir=args.out_dir, summary_path=args.summary)
    except (ParamsError, ContractError) as exc:
        print(f"features: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"features: {summary['samples']} samples, streams {', '.join(summary['streams'])} "
        f"({summary['dtype']}) "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
