"""The API's request and response bodies (pydantic), and readable validation messages.

A clip is JSON nested arrays of numbers: ``(T, 25, 3)`` for one person or ``(M, T, 25, 3)`` for
``M <= 2``, x/y/z in metres, camera space (Kinect v2 joint order, see NTU.md). Pydantic checks the
types only (numbers, no strings or booleans; ``NaN``/``Infinity`` literals and numbers too large for a
float are let through); the shape, length and values are checked by :mod:`stages.preprocess`, the
pipeline's own validation, so a rejected clip gets that module's reason and code.

``POST /v1/predict`` also takes the clip as numpy's ``.npy`` bytes (``Content-Type:
application/x-npy``, :func:`npy_clip`): the same array without the JSON text.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from models.skeleton import MAX_PERSONS, NUM_JOINTS
from stages.preprocess import ClipError

Number = Annotated[float, Strict()]  # ints are numbers too; "1.5" and true are not

_COORDS = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
_FRAME = {"type": "array", "items": _COORDS, "minItems": NUM_JOINTS, "maxItems": NUM_JOINTS}
_TRACK = {"type": "array", "items": _FRAME, "minItems": 1}
_ONE = {**_TRACK, "description": "(T, 25, 3): one person"}
_PERSONS = {
    "type": "array",
    "items": _TRACK,
    "minItems": 1,
    "maxItems": MAX_PERSONS,
    "description": "(M, T, 25, 3): M persons, the same T",
}
CLIP_SCHEMA = {"anyOf": [_ONE, _PERSONS], "description": "joints x, y, z in metres, camera space"}
BATCH_CLIP_SCHEMA = {  # any value: each clip's types and shape are checked on its own (batch_clip)
    "description": "a clip as for /v1/predict: (T, 25, 3) or (M, T, 25, 3) numbers; a clip of another "
    "shape, of other types or with bad values gets an error entry of its own",
}
FRAME_SCHEMA = {"anyOf": [_FRAME, {"type": "array", "items": _FRAME, "minItems": 1, "maxItems": MAX_PERSONS}]}
_LAYOUT_TAGS = ("one", "persons")


def _layout(value: Any) -> str:
    """``persons`` when ``value`` nests four lists deep (``(M, T, 25, 3)``), else ``one``."""
    depth = 0
    while isinstance(value, list) and value:
        value, depth = value[0], depth + 1
    return "persons" if depth >= 4 else "one"


def frame_has_persons(frame: Any) -> bool:
    """True for a frame ``(M, 25, 3)``, False for one person's ``(25, 3)``."""
    return _layout([frame]) == "persons"


def _frame_layout(value: Any) -> str:
    return "persons" if frame_has_persons(value) else "one"


_Clip = Annotated[
    Annotated[list[list[list[Number]]], Tag("one")]
    | Annotated[list[list[list[list[Number]]]], Tag("persons")],
    Discriminator(_layout),
]
Clip = Annotated[_Clip, WithJsonSchema(CLIP_SCHEMA)]
Frame = Annotated[
    Annotated[list[list[Number]], Tag("one")] | Annotated[list[list[list[Number]]], Tag("persons")],
    Discriminator(_frame_layout),
    WithJsonSchema(FRAME_SCHEMA),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    clip: Clip


_CLIP_KEY = re.compile(rb'\s*\{\s*"clip"\s*:\s*')  # how a plain body starts
_SPACE_BYTES = b" \t\r\n"
_PLAIN_BYTES = b"0123456789eE+-.[]," + _SPACE_BYTES  # what a plain clip's value is made of
_chain = itertools.chain.from_iterable


def plain_clip(body: bytes) -> np.ndarray | None:
    """The clip of a ``POST /v1/predict`` body as a float64 array, read without pydantic, or ``None``.

    Pydantic and ``np.asarray`` take 0.82 ms over the 6,300 numbers of a 3-second clip (2-core
    Xeon); this takes 0.39 (0.50 when it checked the nesting on the bytes). It reads only a body
    ``{"clip": ...}`` whose value is JSON numbers in arrays nested 3 or 4 deep, evenly, none empty
    (no other key, string, ``true``/``false``/``null`` or ``NaN`` literal): a body
    :class:`PredictRequest` accepts as it is. Anything else (``None``) goes through
    :class:`PredictRequest`, which says what is wrong, so the answers to bad bodies do not change.
    Both hand :func:`stages.preprocess.joints_from_clip` the same numbers.
    """
    key = _CLIP_KEY.match(body)
    tail = body.rstrip(_SPACE_BYTES)
    if key is None or not tail.endswith(b"}") or tail[key.end() : -1].translate(None, _PLAIN_BYTES):
        return None  # not {"clip": ...}, or a letter, quote, brace or colon in its value
    try:
        level = [orjson.loads(body)["clip"]]  # JSON's number grammar, as pydantic reads it
        dims = []
        while type(level[0]) is list:  # one nesting level of the array at a time: all lists,
            lengths = set(map(len, level))  # all as long (TypeError: a number among them)
            if len(lengths) != 1 or 0 in lengths:  # ragged, or an empty list
                return None
            dims.append(lengths.pop())
            level = list(_chain(level))
        if len(dims) not in (3, 4):
            return None
        # a list among the numbers (deeper in places): TypeError / ValueError
        return np.fromiter(level, dtype=np.float64, count=len(level)).reshape(dims)
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):  # "1.", "+1", "01", 1e999...
        return None


NPY_MEDIA_TYPE = "application/x-npy"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


# The header np.save writes (numpy's format module: a dict literal, then spaces and a newline):
# read with this pattern it costs 2 us, with numpy's reader (ast.literal_eval) 17 us (npy_clip as a
# whole: 3 against 32 us; an in-process timing on a Zen 5 EPYC, hot). Anything else
# is left to numpy's reader; either way the same (shape, fortran order, dtype) come out (tests).
_DIM = rb"(?:0|[1-9][0-9]*)"  # a Python int literal as np.save writes it (no sign, no leading zero)
_NPY_SAVED_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?(?:f[248]|[iu][1248]))', 'fortran_order': (False|True), "
    rb"'shape': \((|" + _DIM + rb",|" + _DIM + rb"(?:, " + _DIM + rb")+)\), \} *\n"
)


def npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The header of ``.npy`` bytes: (shape, Fortran order, dtype, offset of the data); raises
    ``ValueError`` with what is wrong (numpy's reader's message, for a header np.save would not write)."""
    if body[:6] == b"\x93NUMPY" and body[6:8] in (b"\x01\x00", b"\x02\x00"):
        start = 10 if body[6] == 1 else 12  # after the header length: 2 bytes in 1.0, 4 in 2.0
        end = start + int.from_bytes(body[8:start], "little")
        saved = _NPY_SAVED_HEADER.fullmatch(body, start, end) if end <= len(body) else None
        if saved is not None:
            descr, fortran, dims = saved.groups()
            shape = tuple(int(d) for d in dims.split(b",") if d)
            return shape, fortran == b"True", np.dtype(descr.decode()), end
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADERS:
        raise ValueError(f".npy format version {version[0]}.{version[1]}; 1.0 or 2.0 needed")
    try:
        shape, fortran, dtype = _NPY_HEADERS[version](stream)
    except ValueError:
        raise
    except Exception as exc:  # numpy parses the header with ast.literal_eval and tokenize: SyntaxError, ...
        raise ValueError(f"its header is not a Python literal: {type(exc).__name__}: {exc}") from None
    return shape, fortran, dtype, stream.tell()


def npy_clip(body: bytes) -> np.ndarray:
    """The clip of a ``POST /v1/predict`` body in numpy's ``.npy`` format (``np.save`` of the array).

    Read without pickle and without ``np.load``: the header is parsed first and the data must be
    exactly the bytes it declares, so a short body cannot make the server allocate what a forged
    header claims. Integer and floating dtypes of any byte order are taken; the shape and values are
    then checked by :func:`stages.preprocess.joints_from_clip` like a JSON clip's. Raises
    :class:`~stages.preprocess.ClipError` (``bad_npy``) with what is wrong.
    """
    try:
        shape, fortran, dtype, offset = npy_header(body)
    except ValueError as exc:
        raise ClipError("bad_npy", f"the body is not a .npy array ({exc})") from None
    if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
        raise ClipError("bad_npy", f"the array's dtype is {dtype}; send float32 or float64 numbers")
    if any(d < 0 for d in shape):  # numpy's reader takes (-5, -25, 3)
        raise ClipError("bad_npy", f"the header declares shape {shape}, with a negative dimension")
    if not 3 <= len(shape) <= 4:  # before numpy has to make it (at most 64 dimensions)
        raise ClipError("bad_shape", f"expected (T, 25, 3) or (M, T, 25, 3), got an array of shape {shape}")
    data, count = memoryview(body)[offset:], math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise ClipError(
            "bad_npy",
            f"the header declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but {len(data)} follow",
        )
    array = np.frombuffer(data, dtype=dtype, count=count)
    try:
        return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except ValueError as exc:  # an empty array with a dimension beyond what numpy indexes
        raise ClipError("bad_npy", f"the header declares shape {shape}: {exc}") from None


class BatchRequest(_Strict):
    # each clip's types are checked on its own too (batch_clip): one clip of strings or of the wrong
    # nesting gets an error entry, and the others their predictions
    clips: list[Annotated[Any, WithJsonSchema(BATCH_CLIP_SCHEMA)]] = Field(
        min_length=1, description="clips validated and predicted one by one"
    )


_BATCH_CLIP = TypeAdapter(_Clip)


def batch_clip(clips: list, index: int) -> list:
    """Clip ``index`` of a batch request with its types checked as ``/v1/predict`` checks them;
    raises :class:`ClipError` (``invalid_request``, naming the place) when they are wrong."""
    try:
        return _BATCH_CLIP.validate_python(clips[index])
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        errors = [{**e, "loc": ("clips", index, *e["loc"])} for e in errors]
        raise ClipError("invalid_request", describe_errors(errors)) from None


class StreamMessage(_Strict):
    """One WebSocket message from the client: a frame, or a reset of the window."""

    frame: Frame | None = None
    reset: Annotated[bool, Strict()] = False  # true or false, as the frame's numbers are strict


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, in words")
    code: str = Field(description="a stable short name, e.g. bad_shape, not_finite, too_large")


class ClassScore(BaseModel):
    index: int = Field(description="0-based position in probabilities/scores")
    id: int = Field(description="NTU action id (the Aaaa of a file name)")
    name: str
    probability: float


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    top: list[ClassScore] = Field(description="the top_k classes, most probable first")
    probabilities: list[float] = Field(description="softmax per class, averaged over the clips drawn")
    scores: list[float] = Field(
        description="fused logits per class (one clip), or the log of the averaged probabilities"
    )
    frames: int = Field(description="frames of the input")
    clips: int = Field(description="clips the test-time sampling drew from it")
    inference_ms: float = Field(description="wall time of the model call it ran in")


class PredictResponse(Prediction):
    model: ModelRef


class BatchItem(BaseModel):
    index: int
    prediction: Prediction | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[BatchItem] = Field(description="one per clip, in order: a prediction or an error")


class VideoWindow(BaseModel):
    start: int = Field(description="first frame of the window")
    end: int = Field(description="one past its last frame")
    prediction: Prediction = Field(description="as /v1/predict answers; frames: those with people")


class PoseRef(BaseModel):
    version: str = Field(description="the pose export's version (a hash of its graphs)")
    provider: str = Field(description="the ONNX Runtime provider it runs on")


class VideoTiming(BaseModel):
    pose_ms: float = Field(description="decoding, detection, keypoints, lifting and tracking")
    actions_ms: float = Field(description="the action model on every window, preparation included")
    total_ms: float = Field(description="from the request's start, the upload's reception included")
    pose_frames_per_s: float


class VideoSkeletons(BaseModel):
    """The tracked people, frame by frame; zeros where a slot is empty."""

    joints: list = Field(description="(3, T, 25, 2): x, y, z in metres, camera space (the pipeline layout)")
    joints2d: list = Field(description="(T, 2, 25, 2): x, y in video pixels")
    confidence: list = Field(description="(T, 2, 25): keypoint confidence in [0, 1]")
    boxes: list = Field(description="(T, 2, 4): person box x0, y0, x1, y1 in video pixels")
    scores: list = Field(description="(T, 2): detection score")


class VideoResponse(BaseModel):
    model: ModelRef
    pose_model: PoseRef
    frames: int = Field(description="frames analysed (at analysed_fps); window starts and ends count these")
    fps: float = Field(description="the container's frame rate (0 when it does not say)")
    declared_frames: int = Field(
        description="the container's frame count (0 when it does not say; may be wrong)"
    )
    decoded_frames: int = Field(description="the file's frames decoded (before resampling to analysed_fps)")
    unreadable_frames: int = Field(
        description="frames that could not be decoded, followed by a good one; each was shown as the frame "
        "before it (the first good frame for those at the start), so time is kept"
    )
    analysed_fps: float = Field(
        description="the rate the frames were analysed at: the action model's 30 fps (frames dropped or "
        "repeated) unless the video is within 5% of it or its rate is unknown (then the container's, or 0)"
    )
    width: int
    height: int
    people: int = Field(description="people tracked (slots filled in at least one frame), at most 2")
    frames_with_people: int
    windows: list[VideoWindow] = Field(description="the windows with people, in order")
    timing: VideoTiming
    skeletons: VideoSkeletons | None = Field(None, description="with skeletons=true only")


class ClassInfo(BaseModel):
    index: int
    id: int
    name: str


class ModelInfo(BaseModel):
    name: str
    version: str
    benchmark: str
    streams: list[str]
    fusion: str
    classes: list[ClassInfo]
    input: dict[str, Any] = Field(description="the model input and the clip limits this server applies")
    normalisation: dict[str, Any]
    sampling: dict[str, Any]
    metrics: dict[str, Any]
    runtime: dict[str, Any] = Field(
        description="runtime kind, model file, provider in use, threads, batching"
    )
    source: str = Field(description="the bundle directory or MLflow model URI it was loaded from")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    model: ModelRef


def describe_errors(errors: Sequence[dict], shown: int = 3) -> str:
    """Pydantic/FastAPI validation errors as one line: ``clip[0][3][2]: Input should be a valid number``."""
    parts = []
    for error in errors[:shown]:
        path = ""
        for part in error.get("loc", ()):
            if part in _LAYOUT_TAGS:
                continue
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        parts.append(f"{path}: {error['msg']}" if path else error["msg"])
    more = len(errors) - shown
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
