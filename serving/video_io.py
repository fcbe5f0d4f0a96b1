"""Video files in and out for :mod:`serving.video`: uploads, decoding, and the annotated video.

:func:`saved_upload` keeps an upload as a temporary ``.avi`` / ``.mp4`` / ``.mkv`` named by its
content (:func:`sniff_container`), :func:`open_video` decodes frames lazily with OpenCV, at the
action model's 30 frames/s whatever the video's rate, by each frame's own time (:func:`resample`),
and rejects what it cannot use with a :class:`VideoError`, and :func:`annotate` writes the video
back with each actor's skeleton and the actions drawn on it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import statistics
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import cv2
import numpy as np

from models.skeleton import EDGES
from stages.errors import RejectedInput
from stages.video_frames import FrameCount, read_frames

from .settings import Settings

if TYPE_CHECKING:
    from .video import VideoSkeleton
    from .video_actions import WindowActions

MAX_FRAMES = Settings.model_fields["video_max_frames"].default  # 900: 30 s at 30 fps
ACTION_FPS = 30.0  # NTU's Kinect rate: the action model's windows and motion are in these frames
RATE_TOLERANCE = 0.05  # a video within 5% of ACTION_FPS (29.97, NTSC) keeps every frame
# The containers an upload may be, by the kind sniff_container finds in its first bytes: AVI,
# ISO media (MP4, a phone's QuickTime .mov / .m4v, an Android phone's or MMS 3GPP .3gp / .3g2),
# Matroska (a browser's MediaRecorder .webm, .mkv)
CONTAINERS = {
    ".avi": (".avi",),
    ".mp4": (".mp4", ".mov", ".m4v", ".3gp", ".3g2"),
    ".mkv": (".mkv", ".webm"),
}
VIDEO_SUFFIXES = tuple(s for names in CONTAINERS.values() for s in names)
VIDEO_TYPES = {
    **dict.fromkeys(("video/x-msvideo", "video/avi", "video/msvideo", "video/vnd.avi"), ".avi"),
    **dict.fromkeys(("video/mp4", "video/quicktime", "video/x-m4v", "video/3gpp", "video/3gpp2"), ".mp4"),
    **dict.fromkeys(("video/webm", "video/x-matroska"), ".mkv"),
}
KINDS = "an AVI, MP4 / MOV / 3GP or WebM / MKV video"
WRITERS = {".mp4": "mp4v", ".avi": "MJPG"}
SLOT_COLOURS = ((90, 220, 90), (40, 170, 255))  # BGR: slot 0 green, slot 1 orange
MIN_SIDE, MAX_SIDE = 16, 4096  # frame sides in pixels: 4K video either way up
MAX_TALL = 4  # height / width: the detector scales every frame to its fixed width, so its input (and
# the memory of a batch) grows with this ratio: 16x8192 frames took gigabytes and ended in a 500


class VideoError(RejectedInput):
    """A video the pipeline cannot use (unreadable, too short or long, nobody in it)."""


def _whole(value: float) -> int:
    """A capture property that counts (a size, a number of frames) as an int; 0 when it is not a finite
    number (a backend may give NaN or infinity for what it does not know)."""
    return int(value) if math.isfinite(value) else 0


def check_frame_size(width: int, height: int) -> None:
    """Refuse frames of ``width x height`` the pose stage cannot take: a side under :data:`MIN_SIDE`
    or over :data:`MAX_SIDE` pixels, or taller than :data:`MAX_TALL` : 1."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE) or height > MAX_TALL * width:
        raise VideoError(
            "frame_size",
            f"the frames are {width}x{height} pixels; they need {MIN_SIDE} to {MAX_SIDE} pixels a side "
            f"and at most {MAX_TALL} times as tall as wide",
        )


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float  # 0 when the container does not say
    declared_frames: int  # the container's count (may be 0 or wrong; the decoded frames count)
    analysed_fps: float = 0.0  # the rate of the frames open_video yields (0: the container's, unknown)
    # the source frames decoded and those that could not be (each replaced by the frame before it),
    # counted as the frames are read
    read: FrameCount = field(default_factory=FrameCount)

    @property
    def resampled(self) -> bool:
        return self.analysed_fps > 0 and self.analysed_fps != self.fps


# ---- reading videos -----------------------------------------------------------------------------


def sniff_container(head: bytes) -> str | None:
    """The container of a file from its first bytes: ``.avi`` (RIFF/AVI header), ``.mp4`` (an ISO
    media box: MP4, QuickTime, M4V) or ``.mkv`` (an EBML header: Matroska, WebM), else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return ".mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ".mkv"
    return None


def upload_suffix(filename: str | None, content_type: str | None) -> str | None:
    """The container an upload declares (by its name, else its content type; a key of
    :data:`CONTAINERS`), or None."""
    suffix = Path(filename or "").suffix.lower()
    for container, names in CONTAINERS.items():
        if suffix in names:
            return container
    return VIDEO_TYPES.get((content_type or "").split(";")[0].strip().lower())


@contextlib.contextmanager
def saved_upload(source: BinaryIO) -> Iterator[Path]:
    """An uploaded video as a temporary file (OpenCV reads files, not memory), named by its content."""
    head = source.read(16)
    if not head:
        raise VideoError("empty", f"the uploaded file is empty; send {KINDS}")
    suffix = sniff_container(head)
    if suffix is None:
        raise VideoError(
            "unreadable_video",
            f"the file is not {KINDS} "
            "(it starts with neither a RIFF/AVI header, an MP4 box nor an EBML header)",
        )
    with tempfile.TemporaryDirectory(prefix="ntu-video-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        with path.open("wb") as out:
            out.write(head)
            shutil.copyfileobj(source, out, 1 << 20)
        yield path


def _decoded(capture: cv2.VideoCapture, declared: int, count: FrameCount) -> Iterator[np.ndarray]:
    """The frames in order; a frame that cannot be decoded is the one before it again (the picture
    on screen stays, so time is kept; the first good frame stands in for damaged ones before it)."""
    previous, expected = None, 0
    for index, frame in read_frames(capture, declared, 1, count):
        fill = frame if previous is None else previous
        for _ in range(index - expected):
            yield fill.copy()  # a copy: callers may draw on a frame
        yield frame
        previous, expected = frame, index + 1


def analysis_rate(fps: float, target: float = ACTION_FPS) -> float:
    """The rate :func:`open_video` yields a video of ``fps`` at: ``target``, or ``fps`` itself when it
    lies within :data:`RATE_TOLERANCE` of it or is unknown (0, as some containers say)."""
    if target <= 0 or fps <= 0 or abs(fps - target) <= RATE_TOLERANCE * target:
        return fps
    return target


GRID_SNAP_S = 1e-3  # a timestamp within 1 ms of its place on the container's rate grid is on it
MAX_STRETCH = 4  # a frame may last 4 mean frames (7.5 fps in a 30 fps video); longer: a bad stamp
RATE_TRUST = 2.0  # the container's rate stands while the frames' own typical interval is within 2x of its
RECENT_INTERVALS = 15  # ... typical interval: the lower median of the last 15 intervals between stamps


class FrameClock:
    """The frame interval of a video as it is read: the container's ``1 / fps``, unless the frames'
    own timestamps overrule it: their typical interval (the lower median of the last
    :data:`RECENT_INTERVALS` increases from one stamp to the next, per frame) more than
    :data:`RATE_TRUST` times longer or shorter than that. A browser's MediaRecorder WebM has no frame
    rate nor duration in its header: FFmpeg, and so OpenCV, then give the unit of its timestamps,
    1000 fps, for frames about 33 ms apart, and by that rate every frame looked like a bad stamp
    (a 5 s recording became 5 frames).

    ``overrule=False`` keeps the container's rate whatever the stamps say: :func:`open_video` lets
    the stamps overrule only a container that gives no frame count (a live recording's header, as
    MediaRecorder's). A file that states its count and rate keeps them, and stamps far from that
    rate stay bad stamps, as before: a 30 fps file whose stamps are 8x apart (an edit, a slow-motion
    export) would otherwise play 8x slower to the action model."""

    def __init__(self, fps: float, overrule: bool = True):
        self.fps, self.overrule = fps, overrule
        self._recent: deque[float] = deque(maxlen=RECENT_INTERVALS)
        self._previous: tuple[int, float] | None = None  # (index, stamp) of the last finite stamp

    def observe(self, index: int, stamp: float) -> None:
        """Note frame ``index``'s timestamp (seconds; NaN: none)."""
        if not math.isfinite(stamp):
            return
        if self._previous is not None and stamp > self._previous[1] and index > self._previous[0]:
            self._recent.append((stamp - self._previous[1]) / (index - self._previous[0]))
        self._previous = (index, stamp)

    @property
    def interval(self) -> float | None:
        """The frames' typical interval (s) where it overrules the container's rate, else None."""
        if not self._recent or not self.overrule:
            return None
        typical, nominal = statistics.median_low(self._recent), 1 / self.fps
        return None if nominal / RATE_TRUST <= typical <= RATE_TRUST * nominal else typical

    def last_duration(self) -> float:
        """How long the last frame lasts: one frame interval."""
        interval = self.interval
        return 1 / self.fps if interval is None else interval


def _timed(
    capture: cv2.VideoCapture,
    declared: int,
    count: FrameCount,
    fps: float,
    clock: FrameClock | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """``(t, frame)`` of each decoded frame, ``t`` in seconds from the video's start: the frame's own
    timestamp (``CAP_PROP_POS_MSEC``; a phone's variable-rate video has frames 1/60 s apart here and
    1/15 s there), snapped to its place ``index / fps`` on the container's rate grid when within
    :data:`GRID_SNAP_S` of it (some containers give milliseconds). A timestamp that is missing, does
    not increase, or jumps ahead by more than :data:`MAX_STRETCH` frames' worth is taken as the
    grid's step after the last. Damaged frames leave a gap (the one before stays on screen), and
    damaged frames at the start keep their time: the first good frame is shown from 0. Where the
    frames' own times overrule the container's rate (``clock``, :class:`FrameClock`), a frame's worth
    is their typical interval (and there is no grid to snap to)."""
    clock = clock if clock is not None else FrameClock(fps)
    start, last, last_index = None, -math.inf, -1
    for index, frame in read_frames(capture, declared, 1, count):
        ms = capture.get(cv2.CAP_PROP_POS_MSEC)
        stamp = ms / 1000 if math.isfinite(ms) else math.nan
        if start is None:  # the video's start: before any damaged leading frames
            start = (stamp if math.isfinite(stamp) else 0.0) - index / fps
        interval = clock.interval  # from the frames before: a bad stamp cannot vouch for itself
        clock.observe(index, stamp)
        grid, t = index / fps, stamp - start
        if interval is None:  # the container's rate
            step = (index - last_index) / fps
            longest = MAX_STRETCH * step
            if abs(t - grid) < GRID_SNAP_S:
                t = grid
        else:  # the frames' own rate (never stricter than the container's)
            step = (index - last_index) * interval
            longest = MAX_STRETCH * max(step, (index - last_index) / fps)
        if not last < t <= last + longest:  # NaN included
            t = last + step if last > -math.inf else grid
        last, last_index = t, index
        yield t, frame


def resample(
    timed: Iterable[tuple[float, np.ndarray]],
    target: float,
    last_duration: float | Callable[[], float],
) -> Iterator[np.ndarray]:
    """Frames at times ``t`` (seconds) -> frames at ``target`` per second: output frame ``k`` is the
    frame on screen at ``k / target`` (a frame shows from its time until the next frame's, the last
    one for ``last_duration``: seconds, or a function called once the frames are read). So a 60 fps
    video gives every other frame, a 15 fps one each frame twice, a 25 fps one repeats every fifth, a
    constant-rate video at ``target`` every frame once, and a variable-rate one is resampled by its
    frames' own times. Repeats are copies (callers may draw on a frame)."""
    k, shown, until = 0, None, 0.0

    def show(end: float) -> Iterator[np.ndarray]:
        nonlocal k
        first = True
        while k / target < end - 1e-9:  # output time k / target falls before ``end``
            yield shown if first else shown.copy()
            first, k = False, k + 1

    for t, frame in timed:
        if shown is not None:
            yield from show(t)
        shown, until = frame, t
    if shown is not None:
        yield from show(until + (last_duration() if callable(last_duration) else last_duration))


def _limited(frames: Iterable[np.ndarray], max_frames: int, fps: float) -> Iterator[np.ndarray]:
    for count, frame in enumerate(frames, 1):
        if count > max_frames:
            rate = f" at {fps:g} fps ({max_frames / fps:.1f} s)" if fps > 0 else ""
            raise VideoError(
                "too_long",
                f"the video lasts more than {max_frames} frames{rate}; at most {max_frames} are analysed",
            )
        yield frame


@contextlib.contextmanager
def open_video(
    path: Path, max_frames: int = MAX_FRAMES, fps: float = ACTION_FPS
) -> Iterator[tuple[VideoInfo, Iterator[np.ndarray]]]:
    """``(info, frames)`` of the video at ``path``: uint8 BGR frames ``(H, W, 3)``, decoded lazily and
    resampled to ``fps`` (:func:`analysis_rate`; 0 keeps every frame). ``max_frames`` counts the
    frames yielded, so at the default rate it is a duration: 900 frames, 30 s, at any frame rate.
    A frame OpenCV cannot decode does not end the video: the one before it stands in for it
    (:mod:`stages.video_frames`), counted in ``info.read`` once the frames are consumed."""
    if not Path(path).is_file():
        raise VideoError("unreadable_video", f"{path}: no such file")
    capture = cv2.VideoCapture(str(path))
    try:
        width, height = (
            _whole(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            _whole(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        if not capture.isOpened() or width <= 0 or height <= 0:
            raise VideoError("unreadable_video", f"OpenCV cannot decode {Path(path).name} as a video")
        check_frame_size(width, height)
        declared = max(_whole(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        source = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        source = source if np.isfinite(source) and source > 0 else 0.0
        rate = analysis_rate(source, fps)
        expected = declared * rate / source if source and rate else declared
        if math.ceil(expected - 1e-6) > max_frames:
            # the count can lie (an AVI header): refuse at once only when the frame past the limit
            # is there, else decode and let _limited count (the check reads one frame; reopen after)
            beyond = math.floor(max_frames * source / rate) if source and rate else max_frames
            capture.set(cv2.CAP_PROP_POS_FRAMES, beyond)
            if capture.grab():
                at = f" at {source:g} fps, {math.ceil(expected - 1e-6)} at {rate:g} fps"
                at = at if rate != source else ""
                raise VideoError(
                    "too_long", f"the video has {declared} frames{at}; at most {max_frames} are analysed"
                )
            capture.release()
            capture = cv2.VideoCapture(str(path))
        info = VideoInfo(width, height, source, declared, rate)
        if fps > 0 and source > 0:
            clock = FrameClock(source, overrule=declared <= 0)
            frames = resample(_timed(capture, declared, info.read, source, clock), rate, clock.last_duration)
        else:  # every decoded frame (a damaged one: the one before it again)
            frames = _decoded(capture, declared, info.read)
        yield info, _limited(frames, max_frames, rate)
    finally:
        capture.release()


# ---- drawing ------------------------------------------------------------------------------------


def draw_skeleton(image: np.ndarray, uv: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Bones (``models.skeleton.EDGES``) and joints of ``uv (25, 2)`` (pixels) drawn on ``image``."""
    width = max(1, round(image.shape[1] / 320))
    points = [tuple(p) for p in np.rint(uv).astype(int).tolist()]
    for child, parent in EDGES:
        cv2.line(image, points[child], points[parent], colour, width, cv2.LINE_AA)
    for p in points:
        cv2.circle(image, p, width + 1, colour, -1, cv2.LINE_AA)


def _label_of_frames(windows: list[WindowActions], frames: int) -> list[str]:
    """The top action of the window centred nearest each frame, among the windows holding it."""
    labels = [""] * frames
    for t in range(frames):
        holding = [w for w in windows if w.start <= t < w.end]
        if holding:
            best = min(holding, key=lambda w: abs((w.start + w.end) / 2 - t))
            top = best.prediction.top[0]
            labels[t] = f"{top.name} {top.probability:.2f}"
    return labels


def annotate(
    frames: Iterable[np.ndarray],
    skeleton: VideoSkeleton,
    windows: list[WindowActions],
    out_path: Path,
    fps: float = 30.0,
) -> int:
    """Write ``frames`` with each slot's skeleton and box (one colour per slot) and the top action of
    the window to ``out_path`` (``.mp4``: mp4v, ``.avi``: MJPG); returns the frames written."""
    out_path = Path(out_path)
    codec = WRITERS.get(out_path.suffix.lower())
    if codec is None:
        raise ValueError(f"{out_path}: the annotated video must be {' or '.join(WRITERS)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*codec), fps or 30.0, skeleton.size)
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {out_path} with the {codec} codec")
    labels = _label_of_frames(windows, skeleton.frames)
    written = 0
    try:
        for t, frame in enumerate(frames):
            if t >= skeleton.frames:
                break
            image = frame.copy()
            for slot in np.flatnonzero(skeleton.present[t]):
                colour = SLOT_COLOURS[slot]
                x0, y0, x1, y1 = np.rint(skeleton.boxes[t, slot]).astype(int).tolist()
                cv2.rectangle(image, (x0, y0), (x1, y1), colour, 1)
                draw_skeleton(image, skeleton.joints2d[t, slot], colour)
            if labels[t]:
                scale = max(0.4, skeleton.size[0] / 960)
                (w, h), base = cv2.getTextSize(labels[t], cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
                cv2.rectangle(image, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
                cv2.putText(image, labels[t], (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                            cv2.LINE_AA)  # fmt: skip
            writer.write(image)
            written += 1
    finally:
        writer.release()
    return written
