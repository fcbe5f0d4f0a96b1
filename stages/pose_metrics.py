"""Pose metrics: PCK (torso-normalised), 2D pixel error, root-relative 3D error, detection recall."""

from __future__ import annotations

import numpy as np

from models.pose_geometry import box_iou
from models.skeleton import LEFT_SHOULDER

RIGHT_HIP = 16  # PCK's torso: left shoulder to right hip (the LSP / MPII "torso diameter")


def torso_size(uv: np.ndarray) -> np.ndarray:
    """``(N,)`` distance from the left shoulder to the right hip, ``uv (N, 25, 2)``."""
    return np.linalg.norm(uv[:, LEFT_SHOULDER] - uv[:, RIGHT_HIP], axis=-1)


def pose_metrics(
    pred2d: np.ndarray,
    true2d: np.ndarray,
    visible: np.ndarray,
    pred3d: np.ndarray,
    true3d: np.ndarray,
    pixel_scale: np.ndarray,
) -> dict:
    """Metrics over ``N`` people.

    ``pred2d``/``true2d`` ``(N, 25, 2)`` crop pixels; ``visible`` ``(N, 25)`` > 0 where the label counts;
    ``pred3d``/``true3d`` ``(N, 25, 3)`` m, root-relative; ``pixel_scale`` ``(N,)`` colour-frame
    (1920 x 1080) pixels per crop pixel. Returns ``pck@0.2`` and ``pck@0.5`` (fraction of visible
    joints within 0.2 / 0.5 torso sizes; people with a degenerate torso are left out), the mean 2D
    error in colour-frame pixels, and ``mpjpe_mm`` over all 25 joints (root-relative, millimetres).
    """
    err = np.linalg.norm(pred2d - true2d, axis=-1)  # N, 25
    vis = visible > 0
    torso = torso_size(true2d)
    ok = torso > 1e-3
    within = err / np.maximum(torso, 1e-3)[:, None]
    counted = vis & ok[:, None]
    denom = max(int(counted.sum()), 1)
    return {
        "pck@0.2": float(((within <= 0.2) & counted).sum() / denom),
        "pck@0.5": float(((within <= 0.5) & counted).sum() / denom),
        "px_error": float((err * pixel_scale[:, None])[vis].mean()) if vis.any() else float("nan"),
        "mpjpe_mm": float(1000 * np.linalg.norm(pred3d - true3d, axis=-1).mean())
        if len(pred3d)
        else float("nan"),
        "people": len(pred2d),
        "joints_counted": int(counted.sum()),
    }


def detection_recall(pred: list[np.ndarray], true: np.ndarray, iou: float = 0.5) -> dict:
    """Recall and precision of person boxes at ``iou``: ``pred`` per frame ``(K, 4)``, ``true (F, 2, 4)``
    (all-zero rows: nobody)."""
    hits = positives = predicted = 0
    for boxes, truth in zip(pred, true, strict=True):
        truth = truth[truth.any(axis=1)]
        positives += len(truth)
        predicted += len(boxes)
        used: set[int] = set()
        for t in truth:
            scores = [(box_iou(b, t), k) for k, b in enumerate(boxes) if k not in used]
            best = max(scores, default=(0.0, -1))
            if best[0] >= iou:
                hits += 1
                used.add(best[1])
    return {
        "det_recall": hits / max(positives, 1),
        "det_precision": hits / max(predicted, 1),
        "frames": len(pred),
    }
