"""The features stage and the training loader on a small parsed corpus."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from models import features, sampling
from stages import features as features_stage
from stages import parse
from stages.dataset import LoaderParams, ShardBatchSampler, SkeletonDataset, make_loader
from stages.params import ParamsError
from stages.skeleton_text import format_skeleton
from stages.store import ContractError
from tests.factory import STANDING, body, moving

SUBJECTS = [1, 2, 3, 4, 5, 6, 7, 8]  # 1, 2, 4, 5, 8 are NTU X-Sub training subjects


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    for i in range(24):
        frames = int(rng.integers(20, 90))
        xyz = moving(STANDING + rng.normal(0, 0.2, 3), frames, 0.1, i)
        name = f"S001C00{1 + i % 3}P{SUBJECTS[i % 8]:03d}R001A{1 + i % 4:03d}"
        (raw / f"{name}.skeleton").write_bytes(format_skeleton([[body(72057594037931101, x)] for x in xyz]))
    root = tmp_path_factory.mktemp("data")
    pparams = parse.ParseParams(workers=1, classes=(1, 2, 3, 4), shard_samples=4, chunk_samples=2)
    parse.run(pparams, raw_dir=raw, out_dir=root / "parsed")
    fparams = features_stage.FeaturesParams(dtype="float32", shard_samples=4, chunk_samples=2)
    features_stage.run(fparams, in_dir=root / "parsed", out_dir=root / "features")
    return root


def test_streams_are_normalised_and_derived_with_the_shared_math(feature_dir):
    raw = zarr.open_group(str(feature_dir / "parsed" / "skeletons.zarr"), mode="r")
    feats = zarr.open_group(str(feature_dir / "features" / "features.zarr"), mode="r")
    lengths = feats["lengths"][:]
    expected = features.centre(raw["joints"][:])
    assert np.array_equal(feats["joint"][:], expected)
    assert np.array_equal(feats["bone"][:], features.bones(expected))
    assert np.array_equal(feats["joint_motion"][:], features.motion(expected, lengths))
    assert np.array_equal(feats["bone_motion"][:], features.motion(features.bones(expected), lengths))
    assert np.allclose(feats["joint"][:, :, 0, 1, 0], 0)  # spine middle of actor 1, first frame
    assert dict(feats.attrs)["streams"] == list(features.STREAMS)
    table = pq.read_table(feature_dir / "features" / "samples.parquet")
    assert table.num_rows == 24 and table["index"].to_pylist() == list(range(24))


def test_float16_storage_reports_its_rounding(feature_dir, tmp_path):
    params = features_stage.FeaturesParams(
        streams=("joint",), dtype="float16", shard_samples=4, chunk_samples=2
    )
    summary = features_stage.run(params, in_dir=feature_dir / "parsed", out_dir=tmp_path / "f16")
    stored = zarr.open_group(str(tmp_path / "f16" / "features.zarr"), mode="r")["joint"]
    assert stored.dtype == np.float16
    err = summary["max_abs_rounding_error_m"]["joint"]
    assert 0 < err <= 2.0**-11  # values within 1 m of the origin: half a float16 step at most


def test_features_params_are_validated():
    with pytest.raises(ParamsError, match="valid: joint, bone"):
        features_stage.FeaturesParams(streams=("joint", "speed")).validate()


def test_contract_is_checked_on_read(tmp_path):
    zarr.open_group(str(tmp_path / "skeletons.zarr"), mode="w").attrs["layout"] = "N,T,V,C"
    with pytest.raises(ContractError, match="layout"):
        features_stage.run(features_stage.FeaturesParams(), in_dir=tmp_path, out_dir=tmp_path / "out")


def dataset(feature_dir, train, stream="joint", **overrides):
    params = dataclasses.replace(LoaderParams(window=32, min_crop_frames=16), **overrides)
    return SkeletonDataset(
        feature_dir / "features", stream=stream, benchmark="ntu120_xsub", split="train" if train else "test",
        params=params, train=train, seed=3,
    )  # fmt: skip


def test_loader_split_shapes_and_labels(feature_dir):
    train, test = dataset(feature_dir, True), dataset(feature_dir, False)
    assert len(train) == 15 and len(test) == 9  # subjects 1, 2, 4, 5, 8 train
    x, y = train[0]
    assert x.shape == (3, 32, 25, 2) and x.dtype == torch.float32 and 0 <= y < 4
    assert train.num_classes == 4


def test_loader_is_deterministic_and_augments(feature_dir):
    train = dataset(feature_dir, True)
    assert torch.equal(train[2][0], train[2][0])
    train.set_epoch(1)
    assert not torch.equal(train[2][0], dataset(feature_dir, True)[2][0])  # a new epoch, a new crop
    test = dataset(feature_dir, False)
    assert torch.equal(test[1][0], dataset(feature_dir, False)[1][0])


def test_motion_stream_is_computed_after_sampling(feature_dir):
    joint = dataset(feature_dir, False)[4][0].numpy()
    motion = dataset(feature_dir, False, stream="joint_motion")[4][0].numpy()
    np.testing.assert_allclose(motion, features.motion(joint), atol=1e-6)


@pytest.mark.parametrize("stream", ["bone", "bone_motion"])
def test_bones_are_derived_when_the_store_has_only_joints(feature_dir, tmp_path, stream):
    params = features_stage.FeaturesParams(
        streams=("joint",), dtype="float32", shard_samples=4, chunk_samples=2
    )
    features_stage.run(params, in_dir=feature_dir / "parsed", out_dir=tmp_path / "joints_only")
    kwargs = dict(
        stream=stream, benchmark="ntu120_xsub", split="train", params=LoaderParams(window=32), train=True
    )
    derived = SkeletonDataset(tmp_path / "joints_only", **kwargs)
    stored = SkeletonDataset(feature_dir / "features", **kwargs)
    assert derived.source == "joint" and stored.source == "bone"
    for i in (0, 5):
        np.testing.assert_allclose(derived[i][0].numpy(), stored[i][0].numpy(), atol=1e-5)


def test_uniform_multi_clip_testing(feature_dir):
    """Three clips of pyskl's fixed test draws (``uniform_indices`` without an rng), each the stored
    frames at its indices: not three copies of one clip."""
    test = dataset(feature_dir, False, sampling="uniform", test_clips=3)
    assert (test.lengths >= 32).sum() >= 3  # samples whose three draws must differ
    for i in range(len(test)):
        x, _ = test[i]
        raw, length = test.raw(i), int(test.lengths[i])
        assert x.shape == (3, 3, 32, 25, 2) and raw.shape[1] == length
        for clip, indices in zip(x.numpy(), sampling.uniform_indices(length, 32, 3), strict=True):
            assert indices.max() < length and np.array_equal(clip, raw[:, indices])
        if length >= 32:  # the draws differ, so do the clips
            assert not np.array_equal(x[0].numpy(), x[1].numpy()) and not np.array_equal(
                x[1].numpy(), x[2].numpy()
            )


def test_batch_contents_do_not_depend_on_the_worker_count(feature_dir):
    train = dataset(feature_dir, True)
    by_workers = {
        w: ShardBatchSampler(train, 4, shuffle=True, seed=5, num_workers=w, drop_last=True) for w in (0, 2, 3)
    }
    contents = {w: sorted(map(tuple, s)) for w, s in by_workers.items()}
    assert contents[0] == contents[2] == contents[3]
    assert len(contents[0]) == len(train) // 4  # drop_last drops one partial batch at most
    assert list(by_workers[2]) != list(by_workers[0])  # the order differs: each worker's run comes in turn


def test_batches_cover_each_sample_once_and_are_worker_independent(feature_dir):
    train = dataset(feature_dir, True)
    sampler = ShardBatchSampler(train, 4, shuffle=True, seed=1, num_workers=2)
    seen = sorted(i for batch in sampler for i in batch)
    assert seen == list(range(len(train)))
    ranks = [
        ShardBatchSampler(train, 4, shuffle=True, seed=1, rank=r, world_size=2, drop_last=True)
        for r in (0, 1)
    ]
    r0, r1 = ({i for b in s for i in b} for s in ranks)
    assert not r0 & r1 and len(r0) == len(r1)
    # The same batches, value for value, whether 0 or 2 worker processes load them.
    inline = DataLoader(train, batch_sampler=sampler, num_workers=0)
    workers = DataLoader(train, batch_sampler=sampler, num_workers=2)
    pairs = list(zip(inline, workers, strict=True))
    assert len(pairs) == len(sampler) == 4
    for (x0, y0), (x2, y2) in pairs:
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert len(make_loader(train, 4, shuffle=False, num_workers=0)) == 4
