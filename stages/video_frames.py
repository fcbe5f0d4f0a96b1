"""A video's frames through OpenCV, past the frames it cannot decode.

``cv2.VideoCapture.read`` returns False both at the end of a video and on a frame it cannot decode
(a damaged packet); reading on after a damaged frame gives the frames after it. Stopping at the
first failure, as a plain read loop does, silently loses the rest of a video with one bad frame.
:func:`read_frames` reads on, keeps each frame's index in the file (so labels by frame number stay
aligned), and counts what it could not decode. It stops at the container's frame count, or after
:data:`MAX_UNREADABLE_RUN` failures in a row when the count is unknown (:data:`MAX_DAMAGED_RUN` when
it is known: a long damaged stretch is read through; a failed read at the end costs 1-20 us, so a
count that lies costs at most a fraction of a second).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

MAX_UNREADABLE_RUN = 30  # failed reads in a row (1 s at 30 fps) that end a video of unknown length
MAX_DAMAGED_RUN = 10_000  # ... of a video whose container gives its frame count (5.5 min at 30 fps)


@dataclass
class FrameCount:
    """What :func:`read_frames` met, filled in as it reads."""

    decoded: int = 0  # frames yielded
    unreadable: int = 0  # frames that failed to decode with a good frame after them (a damaged frame)


def read_frames(
    capture: cv2.VideoCapture, declared: int, stride: int = 1, count: FrameCount | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, frame)`` for every ``stride``-th frame of ``capture`` that decodes (the others are
    grabbed, not decoded); ``index`` counts the file's frames from 0, damaged ones included.
    ``declared``: the container's frame count (0: unknown); a failure at or past it is the end."""
    count = count if count is not None else FrameCount()
    index = failed = 0
    while True:
        wanted = index % stride == 0
        if wanted:
            ok, frame = capture.read()
        else:
            ok, frame = capture.grab(), None
        if ok:
            count.unreadable += failed
            failed = 0
            if wanted:
                count.decoded += 1
                yield index, frame
        else:
            failed += 1
            if 0 < declared <= index + 1 or failed > (
                MAX_DAMAGED_RUN if declared > 0 else MAX_UNREADABLE_RUN
            ):
                return
        index += 1
