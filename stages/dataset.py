"""The training/evaluation data loader over the features store.

``SkeletonDataset`` is a map-style torch ``Dataset`` of one benchmark split. It opens the Zarr store
lazily in each worker process and reads whole shards into a small LRU cache (one Zarr call per
shard: per-sample Zarr reads cost ~20x more). ``ShardBatchSampler`` orders batches so that each
loader worker (and each distributed rank) walks its own group of shards, shuffled within a window of
``group_shards`` shards, so every shard is decoded once per epoch.

Sampling follows the standard recipe (see :mod:`models.sampling`): random crop ratio and resize to a
window plus random rotation at train time, centre crop at test time, or pyskl's uniform sampling
(``num_clips`` clips at test time). Motion streams are computed after sampling, on the window, as the
CTR-GCN feeder and the exported model do.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from models import features, sampling
from stages.ntu_files import BENCHMARKS
from stages.params import ParamsError
from stages.store import open_store


@dataclass(frozen=True)
class LoaderParams:
    """The ``loader`` section of params.yaml (read by the training and evaluation stages)."""

    window: int = 64  # frames per clip
    sampling: Literal["crop_resize", "uniform"] = "crop_resize"
    train_p_interval: tuple[float, ...] = (0.5, 1.0)  # random crop ratio range (crop_resize)
    test_p_interval: tuple[float, ...] = (0.95,)  # centre crop ratio at test time (crop_resize)
    min_crop_frames: int = 64
    rotation: float = 0.3  # max random rotation per axis at train time, radians (0: off)
    test_clips: int = 1  # clips per test sample (uniform sampling; pyskl uses 10)
    group_shards: int = 2  # shards shuffled together
    cache_shards: int = 4  # decoded shards kept per worker

    def validate(self) -> None:
        if len(self.train_p_interval) != 2 or len(self.test_p_interval) != 1:
            raise ParamsError("params.yaml [loader]: train_p_interval needs 2 values, test_p_interval 1")
        if self.window < 1 or self.test_clips < 1 or self.cache_shards < self.group_shards:
            raise ParamsError(
                "params.yaml [loader]: window, test_clips >= 1 and cache_shards >= group_shards"
            )
        if self.test_clips > 1 and self.sampling != "uniform":
            raise ParamsError("params.yaml [loader]: test_clips > 1 needs sampling: uniform")


def sample_clips(
    x: np.ndarray, params: LoaderParams, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The clips the model sees of one sample ``x`` ``(C, length, V, M)``: ``(K, C, window, V, M)``.

    Test time (``train=False``, no ``rng`` needed): the centre crop resized to ``window``
    (``crop_resize``) or ``test_clips`` uniform clips (pyskl's fixed test draws). Training, evaluation,
    export and the server all sample through here.
    """
    length = x.shape[1]
    if params.sampling == "uniform":
        clips, clip_rng = (1, rng) if train else (params.test_clips, None)  # None: pyskl's test clips
        indices = sampling.uniform_indices(length, params.window, clips, clip_rng)
        return x[:, indices].transpose(1, 0, 2, 3, 4)
    interval = params.train_p_interval if train else params.test_p_interval
    return sampling.crop_resize(x, length, params.window, interval, rng, params.min_crop_frames)[None]


_BASE_STREAM = {"joint": "joint", "bone": "bone", "joint_motion": "joint", "bone_motion": "bone"}


class SkeletonDataset(Dataset):
    """One split of one benchmark of a features store.

    Item ``i`` is ``(x, label)`` with ``x`` float32 ``(C=3, window, V=25, M=2)``, or
    ``(clips, C, window, V, M)`` for multi-clip testing, and ``label`` the 0-based class.
    Augmentation is deterministic given ``(seed, epoch, i)``, whatever the worker layout.
    """

    def __init__(
        self,
        features_dir: str | Path,
        *,
        stream: str,
        benchmark: str,
        split: Literal["train", "test"],
        params: LoaderParams,
        train: bool,
        seed: int = 0,
    ):
        if stream not in _BASE_STREAM:
            raise ValueError(f"unknown stream {stream!r}; valid: {', '.join(_BASE_STREAM)}")
        if benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
        self.path = Path(features_dir)
        self.stream, self.params, self.train, self.seed, self.epoch = stream, params, train, seed, 0
        store = open_store(self.path / "features.zarr", required=())
        stored = tuple(store.attrs.get("streams", ()))
        self.source = _BASE_STREAM[stream] if _BASE_STREAM[stream] in stored else "joint"
        if self.source not in stored:
            raise ValueError(f"{self.path}: the store holds {stored}, not the {self.source!r} stream")
        self.shard_samples = store[self.source].shards[0]
        table = pq.read_table(
            self.path / "samples.parquet", columns=["index", "label", "kept_frames", benchmark]
        )
        mask = np.asarray(table[benchmark].to_pylist(), dtype=object) == split
        self.rows = table["index"].to_numpy()[mask].astype(np.int64)
        self.labels = table["label"].to_numpy()[mask].astype(np.int64)
        self.lengths = table["kept_frames"].to_numpy()[mask].astype(np.int64)
        self.num_classes = len(store.attrs["class_ids"])
        self.class_names = list(store.attrs["class_names"])
        self._array = None
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # workers reopen the store themselves
        return {**self.__dict__, "_array": None, "_cache": collections.OrderedDict()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_of(self, i: int) -> int:
        return int(self.rows[i]) // self.shard_samples

    def _shard(self, shard: int) -> np.ndarray:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        if self._array is None:
            self._array = open_store(self.path / "features.zarr", required=(self.source,))[self.source]
        data = self._array[shard * self.shard_samples : (shard + 1) * self.shard_samples]
        self._cache[shard] = data
        if len(self._cache) > self.params.cache_shards:
            self._cache.popitem(last=False)
        return data

    def raw(self, i: int) -> np.ndarray:
        """The stored base stream of item ``i``, float32 ``(C, length, V, M)``."""
        row, length = int(self.rows[i]), int(self.lengths[i])
        block = self._shard(row // self.shard_samples)
        return block[row % self.shard_samples, :, :length].astype(np.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # (i, epoch) keys come from ShardBatchSampler(tag_epoch=True): persistent loader workers hold
        # their own copy of the dataset, so the epoch must travel with the index to reach them.
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        rng = np.random.default_rng([self.seed, epoch, i])
        clips = sample_clips(self.raw(i), self.params, self.train, rng)  # K, C, window, V, M
        if self.train and self.params.rotation > 0:
            clips = np.stack([sampling.random_rotation(c, self.params.rotation, rng) for c in clips])
        if _BASE_STREAM[self.stream] == "bone" and self.source == "joint":  # bones not stored
            clips = features.bones(clips)  # linear per frame, so it commutes with resizing and rotation
        if self.stream.endswith("_motion"):
            clips = features.motion(clips)
        out = clips[0] if clips.shape[0] == 1 else clips
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), int(self.labels[i])


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of dataset positions grouped by shard, for ``DataLoader(batch_sampler=...)``.

    Each epoch (seeded by ``seed`` and :meth:`set_epoch`): the positions are ordered by shard (shard
    order shuffled), split evenly across ``world_size`` ranks, shuffled inside windows of
    ``group_shards`` shards and cut into batches (``drop_last`` drops at most one partial batch).
    The batches are then dealt to ``num_workers`` streams in contiguous runs and interleaved, so with
    the DataLoader's round-robin dispatch each worker reads only its own shards.
    """

    def __init__(
        self,
        dataset: SkeletonDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        tag_epoch: bool = False,
    ):
        self.tag_epoch = tag_epoch  # yield (position, epoch) pairs instead of positions
        self.shards = np.array([dataset.shard_of(i) for i in range(len(dataset))], dtype=np.int64)
        self.group = dataset.params.group_shards
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.streams = max(num_workers, 1)
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _ordered(self, rng: np.random.Generator) -> np.ndarray:
        shard_ids = np.unique(self.shards)
        if self.shuffle:
            shard_ids = rng.permutation(shard_ids)
        rank_of = np.empty(self.shards.max(initial=0) + 1, dtype=np.int64)
        rank_of[shard_ids] = np.arange(len(shard_ids))
        return np.argsort(rank_of[self.shards], kind="stable")

    def _shuffle_within_groups(self, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shards = self.shards[positions]
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        bounds = [*starts[:: self.group].tolist(), len(positions)]
        return np.concatenate([rng.permutation(positions[lo:hi]) for lo, hi in itertools.pairwise(bounds)])

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self._ordered(rng)
        per_rank = len(order) // self.world_size if self.drop_last else -(-len(order) // self.world_size)
        if per_rank * self.world_size > len(order):  # pad by wrapping, as DistributedSampler does
            order = np.resize(order, per_rank * self.world_size)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.shuffle and len(mine):
            mine = self._shuffle_within_groups(mine, rng)
        batches = [mine[k : k + self.batch_size].tolist() for k in range(0, len(mine), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # Deal contiguous runs of whole batches to the worker streams and interleave them, so the
        # DataLoader's round-robin hands worker w only the batches (and shards) of run w. Batch
        # contents do not depend on the number of workers; only their order does.
        runs = np.array_split(np.arange(len(batches)), self.streams)
        return [
            batches[run[k]] for k in range(max(map(len, runs), default=0)) for run in runs if k < len(run)
        ]

    def __iter__(self):
        if self.tag_epoch:
            return iter([[(i, self.epoch) for i in batch] for batch in self._batches()])
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(
    dataset: SkeletonDataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` with shard-grouped batches; ``pin_memory`` (page-locked batches,
    for asynchronous copies) only when the batches go to a CUDA device.

    Call ``set_loader_epoch(loader, epoch)`` before each epoch: it reshuffles and reseeds augmentation
    (also in persistent workers, since each index carries its epoch).
    """
    sampler = ShardBatchSampler(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        tag_epoch=True,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # The loader draws its workers' base seed when an iterator starts: from this generator, not
        # torch's global one, so a resumed run (whose persistent iterators start again) leaves the
        # global stream, and with it dropout, where the uninterrupted run has it.
        generator=torch.Generator().manual_seed(seed),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a loader made by :func:`make_loader` (shuffle order and augmentation seed)."""
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
