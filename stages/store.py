"""The on-disk contracts shared by the data stages: sharded Zarr arrays, atomic output directories and files.

Skeleton tensors are ``(N, C, T, V=25, M=2)`` float arrays, zero-padded in T, sharded along N
(``shard_samples`` samples per shard file, ``chunk_samples`` per compressed chunk inside it), Blosc
with byte shuffle (LZ4 by default: on skeleton tensors it compresses ~5x and decompresses ~4x faster
than zstd level 3, for a 4.5x instead of 6.5x size reduction). A store of N samples is a few files
per ``shard_samples`` samples, never one per sample. ``lengths`` (int32) and ``labels`` (int32,
0-based) sit beside the tensors, and the group attributes record the layout, units and class list.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from models.skeleton import MAX_PERSONS, NUM_JOINTS

LAYOUT = "N,C,T,V,M"
FORMAT_VERSION = 1


class ContractError(ValueError):
    """A store that does not hold what the pipeline's contract says it must."""


CODECS = ("lz4", "zstd")


def compressor(codec: str, level: int) -> zarr.codecs.BloscCodec:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid: {', '.join(CODECS)}")
    return zarr.codecs.BloscCodec(cname=codec, clevel=level, shuffle=zarr.codecs.BloscShuffle.shuffle)


def create_tensor(
    group: zarr.Group,
    name: str,
    *,
    channels: int,
    frames: int,
    dtype: str,
    shard_samples: int,
    chunk_samples: int,
    codec: str,
    level: int,
    num_samples: int = 0,
) -> zarr.Array:
    """A sharded ``(num_samples, channels, frames, 25, 2)`` array, growable along N."""
    if shard_samples % chunk_samples:
        raise ValueError(
            f"shard_samples ({shard_samples}) must be a multiple of chunk_samples ({chunk_samples})"
        )
    inner = (chunk_samples, channels, frames, NUM_JOINTS, MAX_PERSONS)
    return group.create_array(
        name,
        shape=(num_samples, channels, frames, NUM_JOINTS, MAX_PERSONS),
        dtype=dtype,
        chunks=inner,
        shards=(shard_samples, *inner[1:]),
        compressors=compressor(codec, level),
        fill_value=0,
    )


def write_vector(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A small 1-D array (lengths, labels) in one chunk."""
    array = group.create_array(
        name, shape=values.shape, dtype=values.dtype, chunks=(max(len(values), 1),), fill_value=0
    )
    if len(values):
        array[:] = values


def open_store(path: Path, required: tuple[str, ...]) -> zarr.Group:
    """Open a skeleton store read-only and check the contract (arrays present, shapes consistent)."""
    if not path.exists():
        raise ContractError(f"{path}: store not found (run the stage that makes it first)")
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("layout") != LAYOUT:
        raise ContractError(f"{path}: layout {attrs.get('layout')!r}, expected {LAYOUT!r}")
    missing = [name for name in (*required, "lengths", "labels") if name not in group]
    if missing:
        raise ContractError(f"{path}: missing array(s) {', '.join(missing)}")
    n = group["lengths"].shape[0]
    for name in required:
        shape = group[name].shape
        if len(shape) != 5 or shape[0] != n or shape[3:] != (NUM_JOINTS, MAX_PERSONS):
            raise ContractError(f"{path}/{name}: shape {shape} does not match (N={n}, C, T, 25, 2)")
    if group["labels"].shape[0] != n:
        raise ContractError(f"{path}: {group['labels'].shape[0]} labels for {n} samples")
    return group


def _empty_sibling(final: Path) -> Path:
    """A new empty directory ``.<name>.tmp-<pid>`` beside ``final`` (a stale one from a killed run of
    this pid removed first)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success replace ``final`` with it.

    An interrupted or failed run leaves ``final`` as it was (or absent) and removes the partial
    temporary directory, so a half-written output never looks complete.
    """
    final = Path(final)
    tmp = _empty_sibling(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``final``'s content to; on success rename it over ``final``.

    A killed or failed write leaves ``final`` as it was (or absent), so a half-written output never
    looks complete. The temporary file has ``final``'s own name, in a temporary sibling directory:
    writers that record the name write the same bytes (``torch.save`` names its archive after the
    file; matplotlib picks the format from the suffix).
    """
    final = Path(final)
    tmp_dir = _empty_sibling(final)
    try:
        yield tmp_dir / final.name
        os.replace(tmp_dir / final.name, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# Summary keys that vary from run to run; kept out of the DVC metrics files so that an unchanged
# stage re-run leaves them (and dvc.lock) byte-identical.
VOLATILE_KEYS = ("seconds", "workers", "native_parser")


def write_metrics(path: Path, summary: dict) -> None:
    """Write the deterministic part of a stage summary as JSON (a DVC metrics file), atomically."""
    stable = {k: v for k, v in summary.items() if k not in VOLATILE_KEYS}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(stable, indent=2) + "\n")
