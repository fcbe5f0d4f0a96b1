"""Reading and writing the NTU RGB+D ``.skeleton`` text format (Kinect v2).

Format (whitespace-separated, one record per line, CRLF in the original files)::

    <frameCount>
    per frame: <bodyCount>
      per body: <bodyID> <clippedEdges> <handLeftConfidence> <handLeftState> <handRightConfidence>
                <handRightState> <isRestricted> <leanX> <leanY> <trackingState>
                <jointCount = 25>
                25 x: x y z depthX depthY colorX colorY orientW orientX orientY orientZ trackingState

:func:`parse_skeleton` uses the compiled parser (``stages/_skeleton_parser.c``) when it is built and
this module's pure-Python twin otherwise; both give the same arrays and the same error codes and
messages (a test holds them to it). A leading UTF-8 byte-order mark is skipped. A line ends at
``\r\n``, ``\n`` or a lone ``\r`` (old Mac files), as in Python's universal newlines. The blanks, line
ends, NUL bytes and DOS end-of-file marks (0x1a) after the file's last field are padding (a copy tool's
or editor's, as the reference readers take it), not binary data; a record after the declared frames
is ``trailing_data``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.skeleton import NUM_JOINTS
from stages.errors import RejectedInput

try:  # the compiled parser, built by `pip install -e .`
    from stages import _skeleton_parser as _native
except ImportError:  # pragma: no cover - exercised only where no C compiler was available
    _native = None

# Per-joint values kept from the 12 fields: x y z (metres), depthX depthY, colorX colorY (pixels).
NUM_VALUES = 7
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SkeletonFormatError(RejectedInput):
    """A malformed ``.skeleton`` file."""


@dataclass
class RawSkeleton:
    """One parsed file: every body record of every frame, before denoising.

    ``R`` is the number of body records (a body seen in a frame), ``F`` the declared frame count.
    """

    declared_frames: int
    body_counts: np.ndarray  # int32 (F,): bodies in each frame (0 for an empty frame)
    frame_index: np.ndarray  # int32 (R,): frame of each record, 0-based among all F frames
    body_ids: np.ndarray  # uint64 (R,): the exact 17-digit Kinect bodyIDs
    values: np.ndarray  # float32 (R, 25, 7): x y z depthX depthY colorX colorY
    tracking: np.ndarray  # uint8 (R, 25): 0 not tracked, 1 inferred, 2 tracked

    @property
    def joints(self) -> np.ndarray:
        """float32 ``(R, 25, 3)`` camera-space x, y, z in metres."""
        return self.values[:, :, 0:3]

    @property
    def colors(self) -> np.ndarray:
        """float32 ``(R, 25, 2)`` colour-frame (1920x1080) pixel coordinates."""
        return self.values[:, :, 5:7]


_LINE_END = re.compile(rb"\r\n|\r|\n")
_PADDING = b" \t\x0b\x0c\r\n\x00\x1a"  # what may follow the last field: blanks, line ends, NUL, 0x1a
_PADDING_AS_BLANKS = bytes.maketrans(b"\x00\x1a", b"  ")
# The start of a number that a cut can leave: a sign, a point, or digits ending in an exponent mark.
_NUMBER_START = re.compile(rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?)?|\.?)")


def _without_padding(data: bytes) -> bytes:
    """``data`` with the NUL and 0x1a bytes of its trailing padding made blanks (same length)."""
    start = len(data.rstrip(_PADDING))
    return data if start == len(data) else data[:start] + data[start:].translate(_PADDING_AS_BLANKS)


def _cut_explains(error: SkeletonFormatError, tokens: list[bytes]) -> bool:
    """Whether a cut in the middle of the line of ``tokens`` explains ``error``: too few fields, a last
    field that is the start of a number, or a joint count that is the start of 25."""
    if error.code == "bad_field_count":
        expected = re.search(r"expected a (\d+)-field", error.message)
        return expected is not None and len(tokens) < int(expected.group(1))
    if error.code == "non_numeric":
        field = re.match(r"line \d+ field (\d+):", error.message)
        return (
            field is not None
            and int(field.group(1)) == len(tokens)
            and bool(_NUMBER_START.fullmatch(tokens[-1]))
        )
    return error.code == "bad_joint_count" and len(tokens) == 1 and b"25".startswith(tokens[0])


def _cut_mid_line(error: SkeletonFormatError, data: bytes) -> SkeletonFormatError:
    """Name a file that stops in the middle of its last line as truncated when the cut explains the
    error (a non-finite value or a line with too many fields on that line keeps its own code)."""
    match = re.match(r"line (\d+)", error.message)
    if match is None:
        return error
    ends = list(_LINE_END.finditer(data))
    if int(match.group(1)) != len(ends) + 1:  # not a last line without a line end
        return error
    last = data[ends[-1].end() if ends else 0 :].translate(_PADDING_AS_BLANKS)
    if not _cut_explains(error, last.split()):
        return error
    return SkeletonFormatError(
        "truncated", f"file ends in the middle of line {match.group(1)} ({error.message})"
    )


def _without_bom(data: bytes) -> bytes:
    """The file's text without a leading UTF-8 byte-order mark (editors on Windows add one on save)."""
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def parse_skeleton(data: bytes) -> RawSkeleton:
    """Parse the bytes of a ``.skeleton`` file; raise :class:`SkeletonFormatError` if malformed."""
    if _native is None:
        return parse_skeleton_python(data)  # which skips the byte-order mark itself (once)
    data = _without_bom(data)
    result = _native.parse(data)
    if len(result) == 2:
        raise _cut_mid_line(SkeletonFormatError(*result), data)
    frames, counts, frame_index, ids, values, tracking = result
    return RawSkeleton(
        declared_frames=frames,
        body_counts=np.frombuffer(counts or b"", dtype=np.int32),
        frame_index=np.frombuffer(frame_index or b"", dtype=np.int32),
        body_ids=np.frombuffer(ids or b"", dtype=np.uint64),
        values=np.frombuffer(values or b"", dtype=np.float32).reshape(-1, NUM_JOINTS, NUM_VALUES),
        tracking=np.frombuffer(tracking or b"", dtype=np.uint8).reshape(-1, NUM_JOINTS),
    )


def has_native_parser() -> bool:
    """Whether the compiled parser is in use (else the pure-Python twin is)."""
    return _native is not None


# --------------------------------------------------------------------------------------------
# Pure-Python twin of the compiled parser: same grammar, same results, same messages.


class _Lines:
    def __init__(self, data: bytes):
        pieces = _LINE_END.split(_without_padding(data))  # lines; "\r\n" is one line end
        if len(pieces) > 1 and not pieces[-1]:  # after the last line end: no line (as in C)
            pieces.pop()
        self._lines = pieces
        self._ends = [m.end() for m in _LINE_END.finditer(data)]  # offset after each line end
        self._next = 0
        self.line = 0  # 1-based number of the line last returned
        self.tokens: list[bytes] = []

    def next(self) -> bool:
        while self._next < len(self._lines):
            raw = self._lines[self._next]
            start = self._ends[self._next - 1] if self._next else 0
            self._next += 1
            self.line += 1
            for i, byte in enumerate(raw):
                if (byte < 0x20 and byte not in b"\t\x0b\x0c") or byte >= 0x7F:
                    raise SkeletonFormatError(
                        "binary",
                        f"binary data (byte 0x{byte:02x} at offset {start + i}, line {self.line}): "
                        "not a text .skeleton file",
                    )
            self.tokens = raw.split()
            if self.tokens:
                return True
        return False


def _token_repr(token: bytes) -> str:
    text = token.decode("ascii")
    return text if len(text) <= 36 else text[:36] + "..."


def _parse_number(lines: _Lines, i: int, stored: bool = True) -> float:
    """Field ``i`` of the line as a number. Non-finite values (nan, inf, 1e999) are refused in the
    fields the parser stores and let through in the others, which nothing reads (a Kinect writes e.g.
    an orientation it could not compute as such): a file is not lost for them."""
    token = lines.tokens[i]
    text = token.decode("ascii")
    lowered = (text[1:] if text[:1] in ("+", "-") else text).lower()
    if lowered in ("nan", "inf", "infinity"):
        if not stored:
            return float("nan")
        raise SkeletonFormatError(
            "non_finite", f"line {lines.line} field {i + 1}: non-finite value '{_token_repr(token)}'"
        )
    # The C parser's slow path takes at most 127 characters; longer tokens are not numbers there.
    valid = bool(lowered) and "_" not in text and lowered[0] in "0123456789." and len(text) < 128
    try:
        value = float(text) if valid else None
    except ValueError:
        value = None
    if value is None:
        raise SkeletonFormatError(
            "non_numeric", f"line {lines.line} field {i + 1}: '{_token_repr(token)}' is not a number"
        )
    if not math.isfinite(value) and stored:  # an overflowing literal such as 1e999
        raise SkeletonFormatError(
            "non_finite", f"line {lines.line} field {i + 1}: non-finite value '{_token_repr(token)}'"
        )
    return value


def _parse_count(lines: _Lines, what: str) -> int:
    if len(lines.tokens) != 1:
        raise SkeletonFormatError(
            "bad_field_count",
            f"line {lines.line}: expected the {what} (1 field), found {len(lines.tokens)} fields",
        )
    token = lines.tokens[0]
    if not (token.isdigit() and len(token) <= 9):
        raise SkeletonFormatError(
            "bad_count", f"line {lines.line}: {what} '{_token_repr(token)}' is not a non-negative integer"
        )
    return int(token)


def _truncated(message: str) -> SkeletonFormatError:
    return SkeletonFormatError("truncated", message)


def parse_skeleton_python(data: bytes) -> RawSkeleton:
    """Pure-Python version of :func:`parse_skeleton` (about 50x slower; same results)."""
    data = _without_bom(data)
    try:
        return _parse_python(data)
    except SkeletonFormatError as exc:
        raise _cut_mid_line(exc, data) from None


def _parse_python(data: bytes) -> RawSkeleton:
    lines = _Lines(data)
    if not lines.next():
        raise SkeletonFormatError("empty_file", "file is empty")
    frames = _parse_count(lines, "frame count")
    if frames == 0:
        raise SkeletonFormatError("zero_frames", "file declares 0 frames")
    if frames > len(data) // 2:  # every frame takes at least 2 bytes ("0" and a newline)
        raise _truncated(f"file declares {frames} frames but holds only {len(data)} bytes")
    counts, frame_index, ids, values, tracking = [], [], [], [], []
    for f in range(frames):
        if not lines.next():
            raise _truncated(f"file ends before frame {f + 1} of {frames} (after line {lines.line})")
        bodies = _parse_count(lines, "body count")
        counts.append(bodies)
        for b in range(bodies):
            where = f"file ends inside frame {f + 1} of {frames}"
            if not lines.next():
                raise _truncated(f"{where} (body {b + 1} of {bodies})")
            if len(lines.tokens) != 10:
                raise SkeletonFormatError(
                    "bad_field_count",
                    f"line {lines.line}: expected a 10-field body line, found {len(lines.tokens)} fields",
                )
            token = lines.tokens[0]
            if not (token.isdigit() and len(token) <= 20 and int(token) < 2**64):
                raise SkeletonFormatError(
                    "bad_body_id",
                    f"line {lines.line}: bodyID '{_token_repr(token)}' is not an unsigned 64-bit integer",
                )
            body_id = int(token)
            for i in range(1, 10):
                _parse_number(lines, i, stored=False)
            if not lines.next():
                raise _truncated(f"{where} (body {b + 1} of {bodies})")
            joints = _parse_count(lines, "joint count")
            if joints != NUM_JOINTS:
                raise SkeletonFormatError(
                    "bad_joint_count", f"line {lines.line}: body has {joints} joints, expected 25"
                )
            record = np.empty((NUM_JOINTS, NUM_VALUES), dtype=np.float32)
            states = np.empty(NUM_JOINTS, dtype=np.uint8)
            for j in range(NUM_JOINTS):
                if not lines.next():
                    raise _truncated(f"{where} (joint {j + 1} of 25)")
                if len(lines.tokens) != 12:
                    raise SkeletonFormatError(
                        "bad_field_count",
                        f"line {lines.line}: expected a 12-field joint line, "
                        f"found {len(lines.tokens)} fields",
                    )
                numbers = [_parse_number(lines, i, stored=i < NUM_VALUES) for i in range(12)]
                for i in range(NUM_VALUES):
                    if abs(numbers[i]) > _FLOAT32_MAX:
                        raise SkeletonFormatError(
                            "non_finite",
                            f"line {lines.line} field {i + 1}: '{_token_repr(lines.tokens[i])}' "
                            "is out of float32 range",
                        )
                record[j] = numbers[:NUM_VALUES]
                states[j] = int(numbers[11]) if 0 <= numbers[11] <= 255 else 0
            frame_index.append(f)
            ids.append(body_id)
            values.append(record)
            tracking.append(states)
    if lines.next():
        found = len(lines.tokens)
        first = _token_repr(lines.tokens[0]) + ("" if found == 1 else " ...")
        raise SkeletonFormatError(
            "trailing_data",
            f"declared {frames} frames but the data goes on at line {lines.line} with {found} "
            f"field{'' if found == 1 else 's'}: '{first}'",
        )
    return RawSkeleton(
        declared_frames=frames,
        body_counts=np.asarray(counts, dtype=np.int32),
        frame_index=np.asarray(frame_index, dtype=np.int32),
        body_ids=np.asarray(ids, dtype=np.uint64),
        values=np.asarray(values, dtype=np.float32).reshape(-1, NUM_JOINTS, NUM_VALUES),
        tracking=np.asarray(tracking, dtype=np.uint8).reshape(-1, NUM_JOINTS),
    )


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class BodyRecord:
    """One body in one frame, as written to a ``.skeleton`` file.

    ``joints`` is float ``(25, 11)``: x y z (metres, camera space), depthX depthY (pixels in the
    512x424 depth frame), colorX colorY (pixels in the 1920x1080 colour frame), orientation
    quaternion W X Y Z. ``tracking`` is int ``(25,)`` with 0 not tracked, 1 inferred, 2 tracked.
    """

    body_id: int
    joints: np.ndarray
    tracking: np.ndarray
    clipped_edges: int = 0
    hand_left_confidence: int = 1
    hand_left_state: int = 1
    hand_right_confidence: int = 1
    hand_right_state: int = 1
    is_restricted: int = 0
    lean: tuple[float, float] = field(default=(0.0, 0.0))
    tracking_state: int = 2


# Kinect SDK dumps print floats with 7 significant digits (C++ ostream default precision 6-7).
_JOINT_LINE = " ".join(["%.7g"] * 11) + " %d"


def format_number(value: float) -> str:
    """A float as the Kinect dumps print it (``%.7g``); the parser reads back exactly this value."""
    return "%.7g" % value


def format_skeleton(frames: Sequence[Sequence[BodyRecord]], newline: str = "\r\n") -> bytes:
    """Serialise frames of body records into ``.skeleton`` text (CRLF by default, like the originals)."""
    joint_block = newline.join([_JOINT_LINE] * NUM_JOINTS) + newline
    out = [f"{len(frames)}{newline}"]
    for bodies in frames:
        out.append(f"{len(bodies)}{newline}")
        for body in bodies:
            out.append(
                f"{int(body.body_id)} {body.clipped_edges} {body.hand_left_confidence} "
                f"{body.hand_left_state} {body.hand_right_confidence} {body.hand_right_state} "
                f"{body.is_restricted} {format_number(body.lean[0])} {format_number(body.lean[1])} "
                f"{body.tracking_state}{newline}{NUM_JOINTS}{newline}"
            )
            joints = np.asarray(body.joints, dtype=np.float64)
            if joints.shape != (NUM_JOINTS, 11):
                raise ValueError(f"body joints must be (25, 11), got {joints.shape}")
            rows = np.concatenate([joints, np.asarray(body.tracking, dtype=np.float64)[:, None]], axis=1)
            out.append(joint_block % tuple(rows.ravel().tolist()))
    return "".join(out).encode("ascii")
