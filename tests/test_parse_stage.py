"""The parse stage on a directory mixing valid and malformed files."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from stages import parse, preprocess
from stages.denoise import select_actors
from stages.params import ParamsError
from stages.skeleton_text import BodyRecord, format_skeleton, parse_skeleton
from stages.store import open_store
from tests.factory import STANDING, body, moving, second_person_id_switch

ID = 72057594037931101


def person_file(frames: int, seed: int, second: bool = False) -> bytes:
    xyz = moving(STANDING, frames, 0.1, seed)
    other = moving(STANDING + np.array([1.0, 0, 0.2]), frames, 0.05, seed + 100)
    return format_skeleton(
        [[body(ID, x)] + ([body(ID + 1, o)] if second else []) for x, o in zip(xyz, other, strict=True)]
    )


GOOD = {
    "S001C001P001R001A008": person_file(40, 1),
    "S001C002P002R001A009": person_file(55, 2),
    "S002C003P003R002A050": person_file(35, 3, second=True),
    "S001C002P005R002A008": person_file(30, 4),  # on the official missing lists
    "S001C001P001R001A010": person_file(30, 5),  # class 10 not selected below
}
BAD = {
    "S003C001P001R001A008": b"",
    "S003C001P002R001A008": person_file(40, 6)[:3000],
    "S003C001P003R001A008": b"\x00\xff" * 40,
    "S003C001P004R001A008": person_file(40, 7).replace(b"\r\n25\r\n", b"\r\n20\r\n", 1),
    "S003C001P005R001A008": b"1\r\n0\r\n",
    "not_an_ntu_name": person_file(30, 8),
}
PARAMS = parse.ParseParams(
    dataset="ntu120", classes=(8, 9, 50), workers=1, shard_samples=2, chunk_samples=1, order="name"
)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "sub").mkdir()
    for name, data in {**GOOD, **BAD}.items():
        (root / "sub" if name.endswith("A050") else root).joinpath(f"{name}.skeleton").write_bytes(data)
    (root / "README.txt").write_text("not a skeleton file: ignored")
    return root


@pytest.fixture(scope="module")
def parsed(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("parsed") / "parsed"
    summary = parse.run(PARAMS, raw_dir=raw_dir, out_dir=out, summary_path=out.parent / "summary.json")
    rows = {r["name"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}
    return out, summary, rows


def test_every_file_gets_a_row_with_status_and_reason(parsed):
    _, summary, rows = parsed
    assert set(rows) == set(GOOD) | set(BAD)
    assert (summary["accepted"], summary["rejected"], summary["excluded"]) == (3, 6, 2)
    codes = {name: (r["status"], r["reason_code"]) for name, r in rows.items() if r["status"] != "accepted"}
    assert codes == {
        "S001C002P005R002A008": ("excluded", "missing_list"),
        "S001C001P001R001A010": ("excluded", "class_not_selected"),
        "S003C001P001R001A008": ("rejected", "empty_file"),
        "S003C001P002R001A008": ("rejected", "truncated"),
        "S003C001P003R001A008": ("rejected", "binary"),
        "S003C001P004R001A008": ("rejected", "bad_joint_count"),
        "S003C001P005R001A008": ("rejected", "no_body"),
        "not_an_ntu_name": ("rejected", "bad_name"),
    }
    assert "body has 20 joints, expected 25" in rows["S003C001P004R001A008"]["reason"]
    assert summary["by_reason"]["rejected:binary"] == 1


def test_rows_carry_ids_splits_and_counts(parsed):
    _, _, rows = parsed
    row = rows["S002C003P003R002A050"]
    assert (row["setup"], row["camera"], row["performer"], row["replication"], row["action"]) == (
        2,
        3,
        3,
        2,
        50,
    )
    assert (row["label"], row["raw_frames"], row["kept_frames"], row["bodies_seen"], row["actors_kept"]) == (
        2, 35, 35, 2, 2,
    )  # fmt: skip
    assert row["file"] == "sub/S002C003P003R002A050.skeleton"
    assert (row["ntu60_xsub"], row["ntu60_xview"], row["ntu120_xsub"], row["ntu120_xset"]) == (
        "test", "train", "test", "train",
    )  # fmt: skip


def test_store_contract_and_valid_files_unaltered(parsed, raw_dir):
    out, _, rows = parsed
    group = open_store(out / "skeletons.zarr", required=("joints", "colors"))
    joints, colors = group["joints"], group["colors"]
    assert joints.shape == (3, 3, 300, 25, 2) and colors.shape == (3, 2, 300, 25, 2)
    assert joints.dtype == np.float32 and group["lengths"].dtype == np.int32
    assert dict(group.attrs)["class_ids"] == [8, 9, 50] and dict(group.attrs)["layout"] == "N,C,T,V,M"
    for name in ("S001C001P001R001A008", "S001C002P002R001A009", "S002C003P003R002A050"):
        row = rows[name]
        expected = select_actors(parse_skeleton(GOOD[name]))
        i, length = row["index"], row["kept_frames"]
        assert group["lengths"][i] == length and group["labels"][i] == row["label"]
        assert np.array_equal(joints[i, :, :length], expected.joints)
        assert np.array_equal(colors[i, :, :length], expected.colors)
        assert not joints[i, :, length:].any()
    assert json.loads((out.parent / "summary.json").read_text())["accepted"] == 3
    assert "seconds" not in json.loads((out.parent / "summary.json").read_text())


def test_same_output_with_two_workers(parsed, raw_dir, tmp_path):
    out, _, _ = parsed
    other = tmp_path / "parsed2"
    parse.run(dataclasses.replace(PARAMS, workers=2), raw_dir=raw_dir, out_dir=other)
    a, b = (
        zarr.open_group(str(out / "skeletons.zarr"), mode="r"),
        zarr.open_group(str(other / "skeletons.zarr")),
    )
    for name in ("joints", "colors", "lengths", "labels"):
        assert np.array_equal(a[name][:], b[name][:])
    assert pq.read_table(out / "samples.parquet").equals(pq.read_table(other / "samples.parquet"))


def test_shuffled_order_is_a_seeded_permutation(parsed, raw_dir, tmp_path):
    _, _, rows = parsed
    by_name = {n: r["index"] for n, r in rows.items() if r["status"] == "accepted"}
    assert list(by_name.values()) == sorted(by_name.values())  # order="name": indices follow names
    orders = []
    for seed in (0, 0, 1):
        out = tmp_path / f"shuffled{len(orders)}"
        parse.run(dataclasses.replace(PARAMS, order="shuffled", seed=seed), raw_dir=raw_dir, out_dir=out)
        table = pq.read_table(out / "samples.parquet").to_pylist()
        orders.append([r["name"] for r in table])
        shuffled = zarr.open_group(str(out / "skeletons.zarr"), mode="r")["joints"]
        original = zarr.open_group(str(parsed[0] / "skeletons.zarr"), mode="r")["joints"]
        for r in table:
            if r["status"] == "accepted":
                assert np.array_equal(shuffled[r["index"]], original[by_name[r["name"]]])
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[2])


def test_longer_samples_grow_the_store(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "S001C001P001R001A001.skeleton").write_bytes(person_file(20, 1))
    (tmp_path / "raw" / "S001C001P001R001A002.skeleton").write_bytes(person_file(70, 2))
    params = dataclasses.replace(PARAMS, dataset="synthetic", classes="all", max_frames=30)
    summary = parse.run(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    group = zarr.open_group(str(tmp_path / "out" / "skeletons.zarr"), mode="r")
    assert group["joints"].shape[2] == 90 and summary["max_frames"] == 90
    assert group["lengths"][:].tolist() == [20, 70] and group["labels"][:].tolist() == [0, 1]
    assert (
        group["joints"][1, :, 69].any()
        and group["joints"][0, :, 19].any()
        and not group["joints"][0, :, 20:].any()
    )


@pytest.mark.parametrize("copies", ["broken, good", "good, broken", "good, good"])
def test_a_name_goes_to_its_first_good_copy(tmp_path, copies):
    """Two files of one name (in a/ and b/, read in that order): a broken copy does not take the name
    from a good one, whichever comes first, and a second good copy is the duplicate."""
    data = {"good": person_file(30, 1), "broken": person_file(30, 1)[:2000]}
    for folder, kind in zip("ab", copies.split(", "), strict=True):
        (tmp_path / "raw" / folder).mkdir(parents=True)
        (tmp_path / "raw" / folder / "S001C001P001R001A001.skeleton").write_bytes(data[kind])
    params = dataclasses.replace(PARAMS, dataset="synthetic", classes="all")
    summary = parse.run(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    got = {r["file"].split("/")[0]: (r["status"], r["reason_code"]) for r in rows}
    reasons = {"good": ("accepted", None), "broken": ("rejected", "truncated")}
    expected = {folder: reasons[kind] for folder, kind in zip("ab", copies.split(", "), strict=True)}
    if copies == "good, good":
        expected["b"] = ("rejected", "duplicate")
    assert got == expected and (summary["accepted"], summary["rejected"]) == (1, 1)
    assert zarr.open_group(str(tmp_path / "out" / "skeletons.zarr"), mode="r")["lengths"][:].tolist() == [30]


def test_failed_run_leaves_previous_output_untouched(tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "S001C001P001R001A001.skeleton").write_bytes(person_file(20, 1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("previous")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(parse._ShardWriter, "flush", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        parse.run(dataclasses.replace(PARAMS, classes="all"), raw_dir=tmp_path / "raw", out_dir=out)
    assert {p.name for p in tmp_path.iterdir()} == {"raw", "out"}  # no temporary directory left behind
    assert (out / "marker").read_text() == "previous"


def test_an_unexpected_error_becomes_a_rejected_row(tmp_path, monkeypatch):
    (tmp_path / "S001C001P001R001A001.skeleton").write_bytes(person_file(20, 1))

    def broken(raw, denoise):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(parse, "select_actors", broken)
    settings = parse._Settings(dataset="synthetic", labels={1: 0}, missing=frozenset(), raw_dir=str(tmp_path))
    row, joints, _ = parse.process_file(str(tmp_path / "S001C001P001R001A001.skeleton"), settings)
    assert joints is None and (row["status"], row["reason_code"]) == ("rejected", "internal_error")
    assert "IndexError: index 7 is out of bounds" in row["reason"]


def test_cli_reports_configuration_errors(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("parse:\n  dataset: ntu120\n  workerz: 2\n")
    assert (
        parse.main(["--raw-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--params", str(params)])
        == 2
    )
    assert "unknown key(s) workerz" in capsys.readouterr().err
    params.write_text("parse:\n  dataset: ntu120\n")
    assert (
        parse.main(
            ["--raw-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o"), "--params", str(params)]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_the_denoise_mode_reaches_the_store(tmp_path):
    """``parse.denoise``: "complete" keeps both halves of a second person whose id changes,
    "reference" stores CTR-GCN's tensors (the earlier half dropped)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "S001C001P001R001A050.skeleton").write_bytes(second_person_id_switch(40))
    for mode, person_2_frames in (("complete", 40), ("reference", 20)):
        out = tmp_path / mode
        parse.run(dataclasses.replace(PARAMS, denoise=mode), raw_dir=raw, out_dir=out)
        store = open_store(out / "skeletons.zarr", required=("joints",))
        joints = store["joints"][0]  # 3, T, 25, 2
        assert int(joints[..., 1].any(axis=(0, 2)).sum()) == person_2_frames
        assert store.attrs.get("denoise") == (None if mode == "complete" else mode)  # default: as before
        assert int(joints[..., 0].any(axis=(0, 2)).sum()) == 40
    with pytest.raises(ParamsError, match="denoise"):  # params built in code are checked too
        parse.run(dataclasses.replace(PARAMS, denoise="ctrgcn"), raw_dir=raw, out_dir=tmp_path / "bad")


def test_present_classes_are_those_the_file_names_hold(raw_dir, tmp_path):
    """``classes: present`` (the default for the synthetic corpus): the labels follow the actions in
    the directory, so `-S synthesize.classes=...` reaches parse (a YAML alias to synthesize.classes
    did not: DVC rewrote only the aliased node). A bad name or a missing-list file makes no class."""
    out = tmp_path / "out"
    parse.run(dataclasses.replace(PARAMS, classes="present"), raw_dir=raw_dir, out_dir=out)
    store = open_store(out / "skeletons.zarr", required=())
    assert store.attrs["class_ids"] == [
        8,
        9,
        10,
        50,
    ]  # A010 is in the directory; 'not_an_ntu_name' is not a class
    rows = {r["name"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}
    assert rows["S001C001P001R001A010"]["status"] == "accepted" and rows["S001C001P001R001A010"]["label"] == 2
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "clip.skeleton").write_bytes(GOOD["S001C001P001R001A008"])
    with pytest.raises(ParamsError, match=r"no file under .* has an NTU name"):
        parse.run(
            dataclasses.replace(PARAMS, classes="present"), raw_dir=tmp_path / "odd", out_dir=tmp_path / "o2"
        )


def test_the_extension_is_found_in_any_case(tmp_path):
    """A copy from a case-insensitive file system may spell it .SKELETON: its data is not skipped."""
    (tmp_path / "S001C001P001R001A008.SKELETON").write_bytes(GOOD["S001C001P001R001A008"])
    (tmp_path / "S001C002P002R001A009.skeleton").write_bytes(GOOD["S001C002P002R001A009"])
    (tmp_path / "notes.skeleton.txt").write_text("not a skeleton file")
    assert [p.rsplit("/", 1)[1] for p in parse.discover(tmp_path)] == [
        "S001C001P001R001A008.SKELETON", "S001C002P002R001A009.skeleton",
    ]  # fmt: skip
    summary = parse.run(PARAMS, raw_dir=tmp_path, out_dir=tmp_path / "out")
    assert summary["accepted"] == 2


def test_a_joint_beyond_any_body_is_rejected_but_a_dropped_body_may_hold_it(tmp_path):
    """A kept joint 70 km away would overflow the float16 feature streams (to inf, then a NaN loss):
    the file is rejected with the reason; a far value in a body denoising drops does not matter."""
    xyz = moving(STANDING, 30, 0.1, 1)
    far = xyz.copy()
    far[12, 3, 2] = 7e4
    ghost = np.full((25, 3), 7e4)  # a body seen in 5 frames: dropped by length (<= 11 frames)
    files = {
        "S001C001P001R001A008": format_skeleton([[body(ID, x)] for x in far]),
        "S001C001P002R001A008": format_skeleton(
            [[body(ID, x)] + ([body(ID + 1, ghost)] if t < 5 else []) for t, x in enumerate(xyz)]
        ),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.skeleton").write_bytes(data)
    settings = parse._Settings(dataset="synthetic", labels={8: 0}, missing=frozenset(), raw_dir=str(tmp_path))
    row, joints, _ = parse.process_file(str(tmp_path / "S001C001P001R001A008.skeleton"), settings)
    assert joints is None and (row["status"], row["reason_code"]) == ("rejected", "out_of_range")
    assert row["reason"] == "a kept joint is 7e+04 m from the camera; at most 50 m"
    row, joints, _ = parse.process_file(str(tmp_path / "S001C001P002R001A008.skeleton"), settings)
    assert row["status"] == "accepted" and row["dropped_by_length"] == 1
    np.testing.assert_allclose(joints[..., 0].transpose(1, 2, 0), xyz, atol=1e-5)


def test_a_name_that_is_not_utf8_gets_a_row_and_does_not_stop_the_stage(tmp_path):
    """A file whose name is not valid UTF-8 (a Latin-1 "é", say) is rejected as ``bad_name`` with the
    name shown printable; a good file in a folder with such a name is read as any other."""
    raw = os.fsencode(tmp_path / "raw")
    try:
        os.makedirs(os.path.join(raw, b"caf\xe9"))
    except (OSError, UnicodeError):  # a file system that refuses such names (macOS) cannot have them
        pytest.skip("this file system refuses names that are not valid UTF-8")
    data = person_file(20, 1)
    for name in (b"S001C001P001R001A001.skeleton", b"caf\xe9/S001C001P001R001A002.skeleton"):
        with open(os.path.join(raw, name), "wb") as file:
            file.write(data)
    with open(os.path.join(raw, b"S001C001P001R001A003\xe9.skeleton"), "wb") as file:
        file.write(data)
    params = dataclasses.replace(PARAMS, dataset="synthetic", classes="all")
    summary = parse.run(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    got = {r["file"]: (r["name"], r["status"], r["reason_code"]) for r in rows}
    assert got == {
        "S001C001P001R001A001.skeleton": ("S001C001P001R001A001", "accepted", None),
        "caf\\xe9/S001C001P001R001A002.skeleton": ("S001C001P001R001A002", "accepted", None),
        "S001C001P001R001A003\\xe9.skeleton": ("S001C001P001R001A003\\xe9", "rejected", "bad_name"),
    }
    bad = next(r for r in rows if r["status"] == "rejected")
    assert "is not valid UTF-8" in bad["reason"] and bad["file_bytes"] == len(data)
    assert (summary["accepted"], summary["rejected"]) == (2, 1)


def test_a_duplicate_row_keeps_nothing_of_the_copy_it_was_not_made_from(tmp_path):
    """The second good copy of a name is rejected, and its row has no label, frame or body counts:
    the store holds nothing of that file."""
    for folder in "ab":
        (tmp_path / "raw" / folder).mkdir(parents=True)
        (tmp_path / "raw" / folder / "S001C001P001R001A001.skeleton").write_bytes(person_file(30, 1))
    params = dataclasses.replace(PARAMS, dataset="synthetic", classes="all")
    parse.run(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    good, duplicate = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    assert (good["status"], good["label"], good["kept_frames"], good["bodies_seen"]) == ("accepted", 0, 30, 1)
    assert (duplicate["status"], duplicate["reason_code"]) == ("rejected", "duplicate")
    assert duplicate["index"] == -1
    processed = ("label", "raw_frames", "body_frames", "kept_frames", "bodies_seen", "actors_kept")
    assert all(duplicate[column] is None for column in processed), duplicate
    assert all(duplicate[f"dropped_by_{rule}"] is None for rule in ("length", "spread", "overlap"))
    assert (duplicate["action"], duplicate["file_bytes"]) == (1, good["file_bytes"])


def test_an_uploaded_file_is_prepared_as_parse_stores_it(tmp_path):
    """A single-body file with a frame whose joints are all zero: parse keeps that frame (T = 6), and
    the service's file path (joints_from_skeleton_file, then joints_from_clip with
    drop_empty_frames=False) gives the same T and values; the clip default drops it."""
    xyz = moving(STANDING, 6, 0.1, 1)
    frames = [[body(ID, x)] for x in xyz]
    frames[3] = [BodyRecord(ID, joints=np.zeros((25, 11)), tracking=np.zeros(25))]
    data = format_skeleton(frames)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "S001C001P001R001A001.skeleton").write_bytes(data)
    params = dataclasses.replace(PARAMS, dataset="synthetic", classes="all")
    parse.run(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    store = open_store(tmp_path / "out" / "skeletons.zarr", required=("joints",))
    length = int(store["lengths"][0])
    stored = store["joints"][0, :, :length]  # 3, T, 25, 2
    joints = preprocess.joints_from_skeleton_file(data)  # 3, T, 25, 2
    served = preprocess.joints_from_clip(joints.transpose(3, 1, 2, 0), drop_empty_frames=False)
    assert length == 6 and served.shape == (3, 6, 25, 2) and np.array_equal(served, stored)
    assert not served[:, 3].any()
    assert preprocess.joints_from_clip(joints.transpose(3, 1, 2, 0)).shape[1] == 5  # a client's clip
