"""Skeletons -> actions for :mod:`serving.video`: sliding windows scored by the served action model.

A video's joints ``(3, T, 25, 2)`` are cut into windows (:func:`action_windows`), each window is laid
out as the parse stage lays out a sample (:func:`window_joints`) and prepared with the pipeline's own
:func:`stages.preprocess.prepare`; a window with two actors is also scored with actor 1 alone
(:class:`WindowInputs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.skeleton import MAX_PERSONS
from stages import preprocess
from stages.ntu_files import MUTUAL_ACTIONS

from .model import LoadedModel
from .schemas import Prediction
from .service import summarise_scores
from .settings import Settings
from .video_io import VideoError

_SETTINGS = Settings.model_fields  # the server's defaults are the CLI's and the functions'
WINDOW_FRAMES = _SETTINGS["video_window"].default  # 150: 5 s at 30 fps; NTU's actions last 1-10 s
STRIDE_FRAMES = _SETTINGS["video_stride"].default  # 75


@dataclass(frozen=True)
class WindowActions:
    """The action model's prediction for the frames ``[start, end)``."""

    start: int
    end: int
    prediction: Prediction


def action_windows(frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Spans ``[start, end)`` covering ``frames``: one when ``frames <= window`` (or ``window`` is 0),
    else ``window`` frames every ``stride``, the last one ending at the last frame."""
    if window <= 0 or frames <= window:
        return [(0, frames)]
    if stride < 1:
        raise ValueError(f"stride must be at least 1 frame, got {stride}")
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return [(s, s + window) for s in starts]


def window_joints(joints: np.ndarray, start: int, end: int) -> np.ndarray | None:
    """Joints ``(3, T, 25, 2)`` of ``[start, end)`` as the parse stage leaves a sample: frames with
    nobody dropped, actor 1 in slot 0 (actor 2 moves up when actor 1 is not in the window); None when
    nobody is in the window."""
    x = joints[:, start:end]
    present = np.any(x != 0, axis=(0, 2))  # t, M
    keep = present.any(1)
    if not keep.any():
        return None
    order = np.argsort(~present.any(0), kind="stable")  # the slots seen in the window first
    return np.ascontiguousarray(x[:, keep][..., order])


@dataclass
class WindowInputs:
    """What the action model scores for a video's windows (:func:`window_clips`).

    A window with two actors is scored twice, with both and with actor 1 alone, and :meth:`choose`
    keeps the pair only when the model names a two-person action from it. The action model never saw a
    second body beside a one-person action (its training files have none), and most second people the
    estimator finds in one-person videos are a duplicate box on actor 1: on the held-out videos of the
    default corpus this choice took the video path's top-1 from 0.33 to 0.52 (README).
    """

    spans: list[tuple[int, int]]  # the windows with people, [start, end) frames
    prepared: list[np.ndarray]  # the inputs: each window's clips, then actor 1's alone if it has two
    counts: list[int]  # frames with people in each input
    pairs: list[bool]  # per window: whether it has a second actor (and so two inputs)

    def choose(self, scored: list[Prediction]) -> list[Prediction]:
        """One prediction per window from one per input (``scored[i]`` for ``prepared[i]``)."""
        out, k = [], 0
        for pair in self.pairs:
            both = scored[k]
            out.append(both if not pair or both.top[0].id in MUTUAL_ACTIONS else scored[k + 1])
            k += 1 + pair
        return out


def window_clips(joints: np.ndarray, model: LoadedModel, window: int, stride: int) -> WindowInputs:
    """The windows with people and the model's clips (:func:`stages.preprocess.prepare`) to score for
    each (see :class:`WindowInputs`)."""
    out = WindowInputs([], [], [], [])
    for start, end in action_windows(joints.shape[1], window, stride):
        x = window_joints(joints, start, end)
        if x is None:
            continue
        pair = bool(np.any(x[..., 1]))
        solo = window_joints(np.where(np.arange(MAX_PERSONS) == 0, x, 0), 0, x.shape[1]) if pair else None
        inputs = [x] if solo is None else [x, solo]
        out.spans.append((start, end))
        out.pairs.append(pair)
        for people in inputs:
            out.prepared.append(preprocess.prepare(people, model.loader, model.view_align))
            out.counts.append(people.shape[1])
    return out


def skeleton_to_actions(
    joints: np.ndarray,
    model: LoadedModel,
    *,
    window: int = WINDOW_FRAMES,
    stride: int = STRIDE_FRAMES,
    top: int = 5,
) -> list[WindowActions]:
    """Joints ``(3, T, 25, 2)`` -> the top ``top`` actions of each window (one model call for all)."""
    inputs = window_clips(joints, model, window, stride)
    if not inputs.spans:
        raise VideoError("no_person", "no window of the video has a person in it")
    started = time.perf_counter()
    scores = model.run(np.concatenate(inputs.prepared))
    ms = (time.perf_counter() - started) * 1000
    scored, k = [], 0
    for clips, n in zip(inputs.prepared, inputs.counts, strict=True):
        scored.append(summarise_scores(scores[k : k + len(clips)], model.labels, top, n, ms))
        k += len(clips)
    return [WindowActions(a, b, p) for (a, b), p in zip(inputs.spans, inputs.choose(scored), strict=True)]
