"""The .skeleton parser: exact values, every malformed-input kind, and C/Python agreement."""

from __future__ import annotations

import numpy as np
import pytest

from stages import skeleton_text as st
from tests.factory import STANDING, as_written, body, moving

ID_A = 72057594037931101
ID_B = 72057594037931102  # float64 cannot tell these two apart

PARSERS = [pytest.param(st.parse_skeleton, id="native"), pytest.param(st.parse_skeleton_python, id="python")]

# The first body line and joint line of a real NTU file (S001C001P001R001A001), verbatim.
REAL_FRAME = (
    b"1\r\n1\r\n72057594037931101 0 1 1 1 1 0 0.02764709 0.05745083 2\r\n25\r\n"
    + b"0.2181813 0.1725006 3.785027 277.4376 191.9117 1036.508 519.1667 "
    b"-0.2454222 0.0247218 0.9689068 -0.00952301 2\r\n" * 25
)


def two_body_file(newline: str = "\r\n") -> tuple[bytes, np.ndarray, np.ndarray]:
    xyz_a, xyz_b = (
        moving(STANDING, 4, 0.1, seed=1),
        moving(STANDING + np.array([1.0, 0, 0.5]), 4, 0.1, seed=2),
    )
    frames = [
        [body(ID_A, xyz_a[0])],
        [],
        [body(ID_A, xyz_a[2]), body(ID_B, xyz_b[2])],
        [body(ID_B, xyz_b[3])],
    ]
    return st.format_skeleton(frames, newline=newline), xyz_a, xyz_b


def test_native_parser_is_built():
    assert st.has_native_parser(), "the C extension should be built by `make install`"


@pytest.mark.parametrize("parse", PARSERS)
def test_real_ntu_lines_parse_to_exact_values(parse):
    raw = parse(REAL_FRAME)
    assert raw.declared_frames == 1 and raw.body_ids.tolist() == [ID_A]
    expected = np.float32([0.2181813, 0.1725006, 3.785027, 277.4376, 191.9117, 1036.508, 519.1667])
    assert np.array_equal(raw.values[0, 0], expected)
    assert raw.tracking[0].tolist() == [2] * 25


@pytest.mark.parametrize("parse", PARSERS)
def test_a_utf8_byte_order_mark_is_skipped(parse):
    """A file saved by an editor that adds a BOM reads as the same file; a BOM anywhere else is binary."""
    data, _, _ = two_body_file()
    plain, marked = parse(data), parse(b"\xef\xbb\xbf" + data)
    assert marked.declared_frames == 4 and marked.body_ids.tolist() == plain.body_ids.tolist()
    assert np.array_equal(marked.values, plain.values) and np.array_equal(marked.tracking, plain.tracking)
    with pytest.raises(st.SkeletonFormatError) as info:
        parse(b"4\r\n\xef\xbb\xbf" + data[3:])
    assert info.value.code == "binary" and "line 2" in info.value.message


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_two_bodies_empty_frame_and_exact_ids(parse, newline):
    data, xyz_a, xyz_b = two_body_file(newline)
    assert (b"\r\n" in data) == (newline == "\r\n")
    raw = parse(data)
    assert raw.declared_frames == 4
    assert raw.body_counts.tolist() == [1, 0, 2, 1]
    assert raw.frame_index.tolist() == [0, 2, 2, 3]
    assert raw.body_ids.dtype == np.uint64
    assert raw.body_ids.tolist() == [ID_A, ID_A, ID_B, ID_B]
    assert np.array_equal(raw.joints[0], as_written(xyz_a[0]))
    assert np.array_equal(raw.joints[3], as_written(xyz_b[3]))
    colors = as_written(980 + 1081 * xyz_b[3][:, 0] / xyz_b[3][:, 2])
    assert np.array_equal(raw.colors[3][:, 0], colors)


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize(
    "token",
    [
        "1e-5",
        "-7.45058e-09",
        "1.5E+2",
        "+3",
        ".5",
        "5.",
        "0.000000000000000000001234567",
        "123456789012345678901",
    ],
)
def test_number_forms_match_python_float(parse, token):
    data = REAL_FRAME.replace(b"0.2181813 ", token.encode() + b" ", 1)
    assert parse(data).values[0, 0, 0] == np.float32(float(token))


def _with(old: bytes, new: bytes) -> bytes:
    return REAL_FRAME.replace(old, new, 1)


HEADER_END = REAL_FRAME.index(b"25\r\n") + 4

BAD_INPUTS = {
    "empty_file": (b"", "file is empty"),
    "blank_only": (b"\r\n  \r\n", "file is empty"),
    "zero_frames": (b"0\r\n", "declares 0 frames"),
    "truncated": (REAL_FRAME[:HEADER_END] + b"0.1 0.2 3 1 2 3 4 1 0 0 0 2\r\n", "ends inside frame 1"),
    "cut_mid_line": (REAL_FRAME[:200], "file ends in the middle of line 6"),
    "frame_count_lies_high": (b"2" + REAL_FRAME[1:], "ends before frame 2 of 2"),
    "frame_count_lies_low": (REAL_FRAME + b"1\r\n", "declared 1 frames but the data goes on"),
    "bad_joint_count": (_with(b"\r\n25\r\n", b"\r\n24\r\n"), "body has 24 joints, expected 25"),
    "short_joint_line": (_with(b" -0.00952301 2\r\n", b" 2\r\n"), "expected a 12-field joint line, found 11"),
    "non_numeric": (_with(b"277.4376", b"27x.4376"), "'27x.4376' is not a number"),
    "nan": (_with(b"3.785027", b"nan"), "non-finite value 'nan'"),
    "inf": (_with(b"3.785027", b"-inf"), "non-finite value '-inf'"),
    "overflow": (_with(b"3.785027", b"1e999"), "non-finite value '1e999'"),
    "float32_overflow": (_with(b"3.785027", b"1e300"), "'1e300' is out of float32 range"),
    "bad_body_id": (_with(b"72057594037931101", b"7205759403793110x"), "bodyID '7205759403793110x'"),
    "negative_count": (b"-1\r\n", "frame count '-1' is not a non-negative integer"),
    "huge_frame_count": (b"999999999\r\n", "declares 999999999 frames but holds only 11 bytes"),
    "overlong_number": (_with(b"0.2181813", b"0." + b"0" * 140 + b"1"), "is not a number"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", "binary data (byte 0x89 at offset 0, line 1)"),
    "nul_inside": (_with(b"0.1725006", b"0.17\x0025006"), "binary data (byte 0x00"),
}

EXPECTED_CODE = {
    "blank_only": "empty_file",
    "cut_mid_line": "truncated",
    "frame_count_lies_high": "truncated",
    "frame_count_lies_low": "trailing_data",
    "short_joint_line": "bad_field_count",
    "nan": "non_finite",
    "inf": "non_finite",
    "overflow": "non_finite",
    "float32_overflow": "non_finite",
    "negative_count": "bad_count",
    "huge_frame_count": "truncated",
    "overlong_number": "non_numeric",
    "nul_inside": "binary",
}


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_malformed_input_gets_code_and_reason(parse, kind):
    data, phrase = BAD_INPUTS[kind]
    with pytest.raises(st.SkeletonFormatError) as info:
        parse(data)
    assert info.value.code == EXPECTED_CODE.get(kind, kind)
    assert phrase in info.value.message


NON_FINITE = (b"nan", b"-inf", b"Infinity", b"1e999")


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("token", NON_FINITE)
def test_non_finite_values_in_fields_nothing_reads_do_not_lose_the_file(parse, token):
    """An orientation (joint fields 8-11), the tracking state (12) or a body line's lean / state
    fields may be non-finite and the file still parses to the same joints (the state reads as 0,
    "not tracked"); a non-finite x, y, z, depth or colour value is refused (BAD_INPUTS)."""
    clean = parse(REAL_FRAME)
    for old, new in (
        (b" -0.2454222 ", b" " + token + b" "),  # orientation W of the first joint
        (b" -0.00952301 2\r\n", b" " + token + b" 2\r\n"),  # orientation Z
        (b" 0.02764709 0.05745083 2\r\n", b" " + token + b" 0.05745083 2\r\n"),  # leanX
    ):
        got = parse(_with(old, new))
        assert np.array_equal(got.values, clean.values) and np.array_equal(got.tracking, clean.tracking)
    state = parse(_with(b" -0.00952301 2\r\n", b" -0.00952301 " + token + b"\r\n"))
    assert np.array_equal(state.values, clean.values)
    assert state.tracking[0, 0] == 0 and np.array_equal(state.tracking[0, 1:], clean.tracking[0, 1:])
    for field in (b"3.785027", b"277.4376", b"1036.508"):  # z, depthX, colorX: stored, so refused
        with pytest.raises(st.SkeletonFormatError) as info:
            parse(_with(field, token))
        assert info.value.code == "non_finite"


def _mutations(data: bytes, count: int, seed: int):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"0123456789.-+eE \r\nxn\x00\t", dtype=np.uint8)
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(buf)))
            action = rng.integers(0, 3)
            if action == 0:
                buf[pos] = int(rng.choice(alphabet))
            elif action == 1:
                del buf[pos]
            else:
                buf[pos:pos] = bytes([int(rng.choice(alphabet))])
        yield bytes(buf)


def test_native_and_python_parsers_agree_on_mutated_files():
    data, _, _ = two_body_file()
    outcomes = set()
    for mutated in _mutations(data, 300, seed=7):
        results = []
        for parse in (st.parse_skeleton, st.parse_skeleton_python):
            try:
                raw = parse(mutated)
                arrays = (raw.body_ids, raw.values, raw.body_counts, raw.frame_index, raw.tracking)
                results.append(("ok", *(a.tobytes() for a in arrays), raw.declared_frames))
            except st.SkeletonFormatError as exc:
                results.append((exc.code, exc.message))
        assert results[0] == results[1], mutated
        outcomes.add(results[0][0])
    assert {"ok", "non_numeric", "bad_field_count"} <= outcomes  # the fuzzing reached varied paths


@pytest.mark.parametrize("end", [b"", b"\r\n", b"\n\n"])
@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_both_parsers_name_the_same_line_when_frames_are_missing(newline, end):
    """A frame count larger than the frames: both say after which line the file ended (the empty
    piece after the last newline is no line; a blank line at the end is one)."""
    data, _, _ = two_body_file(newline)
    data = b"5" + data[1:] + end  # 5 frames declared, 4 there
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    for parse in (st.parse_skeleton, st.parse_skeleton_python):
        with pytest.raises(st.SkeletonFormatError) as info:
            parse(data)
        assert (info.value.code, info.value.message) == (
            "truncated",
            f"file ends before frame 5 of 5 (after line {lines})",
        ), parse


def test_writer_refuses_wrong_joint_shape():
    bad = body(ID_A, STANDING)
    bad.joints = bad.joints[:24]
    with pytest.raises(ValueError, match="must be \\(25, 11\\)"):
        st.format_skeleton([[bad]])


def _arrays(raw: st.RawSkeleton) -> tuple:
    arrays = (raw.body_counts, raw.frame_index, raw.body_ids, raw.values, raw.tracking)
    return (raw.declared_frames, *(a.tobytes() for a in arrays))


def _outcome(parse, data: bytes) -> tuple:
    try:
        return ("ok", *_arrays(parse(data)))
    except st.SkeletonFormatError as exc:
        return (exc.code, exc.message)


@pytest.mark.parametrize("parse", PARSERS)
def test_lone_cr_line_ends_read_as_python_reads_them(parse):
    """Old Mac line ends ("\\r" alone) are line ends, as in Python's universal newlines (CTR-GCN's
    reader); "\\r\\n" stays one line end, so line numbers are those of the CRLF file."""
    crlf, _, _ = two_body_file("\r\n")
    assert _arrays(parse(two_body_file("\r")[0])) == _arrays(parse(crlf))
    mixed = crlf.replace(b"\r\n", b"\r", 40)  # the first 40 line ends CR only, the rest CRLF
    assert _arrays(parse(mixed)) == _arrays(parse(crlf))
    assert _arrays(parse(crlf.replace(b"\r\n", b"\r\r\n"))) == _arrays(parse(crlf))  # blank lines
    for data in (two_body_file("\r")[0], mixed):
        with pytest.raises(st.SkeletonFormatError) as info:
            parse(data.replace(b"25", b"24", 1))  # the first body's joint count, line 4
        assert (info.value.code, info.value.message) == (
            "bad_joint_count",
            "line 4: body has 24 joints, expected 25",
        )
    data = b"5" + two_body_file("\r")[0][1:]  # 5 frames declared, 4 there: 1 + 4 + 4 * 27 lines
    with pytest.raises(st.SkeletonFormatError, match=r"ends before frame 5 of 5 \(after line 113\)"):
        parse(data)


LAST_JOINT = REAL_FRAME.rindex(b"\r\n", 0, len(REAL_FRAME) - 2) + 2  # start of line 29, the last

CUT_LAST_LINE = {  # the file ends without a line end after its last line, line 29
    "too_few_fields": (REAL_FRAME[:-3], "truncated", "expected a 12-field joint line, found 11"),
    "number_cut_short": (REAL_FRAME[:-2] + b"e", "truncated", "'2e' is not a number"),
    "joint_count_cut": (REAL_FRAME[: HEADER_END - 3], "truncated", "line 4: body has 2 joints"),
    "cut_then_padding": (REAL_FRAME[:-3] + b"\x00" * 4, "truncated", "found 11 fields"),
    "non_finite": (
        REAL_FRAME[:LAST_JOINT] + b"nan" + REAL_FRAME[LAST_JOINT + 9 : -2],
        "non_finite",
        "line 29 field 1: non-finite value 'nan'",
    ),
    "too_many_fields": (REAL_FRAME[:-2] + b" 0", "bad_field_count", "found 13 fields"),
    "not_a_number": (REAL_FRAME[:-3] + b"x", "non_numeric", "line 29 field 12: 'x' is not a number"),
}


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("kind", sorted(CUT_LAST_LINE))
def test_a_cut_last_line_is_truncated_only_where_the_cut_explains_the_error(parse, kind):
    """A file ending inside its last line is ``truncated`` when the cut explains what is wrong there
    (too few fields, a number or count cut short); a non-finite value or a 13th field keeps its code."""
    data, code, phrase = CUT_LAST_LINE[kind]
    with pytest.raises(st.SkeletonFormatError) as info:
        parse(data)
    assert info.value.code == code and phrase in info.value.message
    assert ("file ends in the middle of line" in info.value.message) == (code == "truncated")


PADDING = {
    "nul": b"\x00" * 16,
    "ctrl_z": b"\x1a",
    "mixed": b"\r\n\x00\x00\r\n\x1a \t",
    "whitespace": b" \t\r\n\r\n  ",
    "cr_only": b"\r\r",
}


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("tail", sorted(PADDING))
def test_padding_after_the_last_frame_is_not_data(parse, tail):
    """NUL padding, a DOS end-of-file mark (0x1a) or blanks after the declared frames lose nothing:
    the file reads as without them (the reference readers accept it), with or without a last line end."""
    clean = _arrays(parse(REAL_FRAME))
    assert _arrays(parse(REAL_FRAME + PADDING[tail])) == clean
    assert _arrays(parse(REAL_FRAME[:-2] + PADDING[tail])) == clean
    with pytest.raises(st.SkeletonFormatError) as info:  # padding after a missing frame: still truncated
        parse(b"2" + REAL_FRAME[1:] + PADDING[tail])
    assert info.value.code == "truncated" and "ends before frame 2 of 2" in info.value.message


TRAILING = {  # what follows the one declared frame -> code and message
    b"1\r\n": ("trailing_data", "declared 1 frames but the data goes on at line 30 with 1 field: '1'"),
    b"\r\n0.2 0.1 3\r\n\x00\x00": (
        "trailing_data",
        "declared 1 frames but the data goes on at line 31 with 3 fields: '0.2 ...'",
    ),
    # padding is what follows the file's last field: a NUL with data after it is binary data
    b"\x00\x00garbage": ("binary", "binary data (byte 0x00 at offset 2840, line 30)"),
    b"\x00\x00\xff\x00": ("binary", "binary data (byte 0x00 at offset 2840, line 30)"),
}


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("tail", sorted(TRAILING))
def test_a_record_after_the_declared_frames_is_refused_saying_what_was_found(parse, tail):
    code, phrase = TRAILING[tail]
    with pytest.raises(st.SkeletonFormatError) as info:
        parse(REAL_FRAME + tail)
    assert info.value.code == code and phrase in info.value.message


def test_the_byte_order_mark_is_skipped_once_without_the_compiled_parser(monkeypatch):
    """Without the compiled parser, parse_skeleton gives the native result: one BOM skipped, a second
    one is binary data."""
    data = b"\xef\xbb\xbf" * 2 + REAL_FRAME
    native = _outcome(st.parse_skeleton, data)
    monkeypatch.setattr(st, "_native", None)
    assert _outcome(st.parse_skeleton, data) == native
    assert native[0] == "binary" and "offset 0, line 1" in native[1]
    assert _outcome(st.parse_skeleton, b"\xef\xbb\xbf" + REAL_FRAME)[0] == "ok"


def test_native_and_python_parsers_agree_on_line_ends_and_padding():
    """The mutation fuzz on CR-only and LF files, with padding or a record after the last frame."""
    tails = [b"", b"\x00" * 5, b"\x1a", b"\r\n\x00\r\n", b"\r", b"0\r\n", b"\x00x", b"\x00\xff", b"1 2\x00"]
    outcomes = set()
    for i, mutated in enumerate(_mutations(two_body_file("\r")[0], 150, seed=11)):
        for data in (mutated, mutated.replace(b"\r", b"\n")):
            data += tails[i % len(tails)]
            native, python = _outcome(st.parse_skeleton, data), _outcome(st.parse_skeleton_python, data)
            assert native == python, data
            outcomes.add(native[0])
    assert {"ok", "binary", "trailing_data", "bad_field_count", "non_numeric"} <= outcomes
