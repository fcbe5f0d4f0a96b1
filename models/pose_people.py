"""The person side of :mod:`models.pose`: CenterNet-style centre targets, decoding and the loss.

Frames are read at 1/8 (:data:`DETECT_STRIDE`): a person-centre heatmap, box sizes in cells and
sub-cell offsets; :func:`decode_people` finds up to K people with a 3x3 max-pool NMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

DETECT_STRIDE = 8  # person centres: 1/8 of the input


class DetectOutputs(NamedTuple):
    """Person-localisation outputs for ``N`` frames of ``(H, W)`` pixels (``h, w = H / 8, W / 8``)."""

    centre: torch.Tensor  # N, 1, h, w: probability that a person's centre falls in the cell
    size: torch.Tensor  # N, 2, h, w: box (w, h) in cells (input pixels / 8)
    offset: torch.Tensor  # N, 2, h, w: (x, y) of the centre inside its cell, in cells
    centre_logits: torch.Tensor  # N, 1, h, w: before the sigmoid (for focal_loss)


class People(NamedTuple):
    """Up to ``K`` people per image, best first; unused slots have ``valid`` False."""

    boxes: torch.Tensor  # N, K, 4: (cx, cy, w, h) input pixels, centre in pixel-centre convention
    scores: torch.Tensor  # N, K: centre probability
    valid: torch.Tensor  # N, K bool: score >= threshold


# ---- people: CenterNet targets and decoding -------------------------------------------------------


class CentreTargets(NamedTuple):
    """Training targets for :meth:`PoseEstimator.detect` (``h, w`` = frame size / stride)."""

    centre: torch.Tensor  # N, 1, h, w: truncated gaussians, exactly 1 at each person's centre cell
    size: torch.Tensor  # N, 2, h, w: box (w, h) in cells at the centre cells, 0 elsewhere
    offset: torch.Tensor  # N, 2, h, w: centre (x, y) minus its cell index, at the centre cells
    mask: torch.Tensor  # N, 1, h, w: 1 at the centre cells


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """CenterNet's radius (in the units of the box sizes, elementwise) within which a corner-shifted box
    keeps IoU >= ``min_overlap``; the smallest of its three cases, as in the published code."""
    area = height * width
    b1 = height + width
    r1 = (b1 + torch.sqrt(b1**2 - 4 * area * (1 - min_overlap) / (1 + min_overlap))) / 2
    b2 = 2 * (height + width)
    r2 = (b2 + torch.sqrt(b2**2 - 16 * (1 - min_overlap) * area)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * (min_overlap - 1) * area)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def centre_targets(
    boxes: torch.Tensor,
    out_size: tuple[int, int],
    valid: torch.Tensor | None = None,
    stride: int = DETECT_STRIDE,
    min_overlap: float = 0.7,
) -> CentreTargets:
    """Boxes ``(N, P, 4)`` ``(cx, cy, w, h)`` in input pixels -> :class:`CentreTargets` at ``out_size``.

    ``valid`` ``(N, P)`` marks real people (default: boxes with positive size). A centre falls in cell
    ``floor((c + 0.5) / stride)``; its gaussian has CenterNet's radius for the box size in cells and
    ``sigma = (2 r + 1) / 6``, truncated outside the radius. When two people share a cell the later
    one's size and offset win.
    """
    h, w = out_size
    if valid is None:
        valid = (boxes[..., 2] > 0) & (boxes[..., 3] > 0)
    cells = (boxes[..., :2] + 0.5) / stride  # N, P, 2: centre in cell units
    upper = torch.tensor([w - 1, h - 1], dtype=boxes.dtype, device=boxes.device)
    cell = torch.minimum(cells.floor().clamp(min=0), upper)  # N, P, 2
    size = boxes[..., 2:] / stride  # N, P, 2
    radius = gaussian_radius(size[..., 1], size[..., 0], min_overlap).floor().clamp(min=0)  # N, P
    sigma = (2 * radius + 1) / 6
    xs = torch.arange(w, dtype=boxes.dtype, device=boxes.device).reshape(1, 1, 1, w)
    ys = torch.arange(h, dtype=boxes.dtype, device=boxes.device).reshape(1, 1, h, 1)
    dx = xs - cell[..., 0, None, None]  # N, P, 1, w
    dy = ys - cell[..., 1, None, None]  # N, P, h, 1
    r, s = radius[..., None, None], sigma[..., None, None]
    inside = (dx.abs() <= r) & (dy.abs() <= r) & valid[..., None, None]  # N, P, h, w
    gauss = torch.where(inside, torch.exp(-(dx**2 + dy**2) / (2 * s**2)), 0.0)  # N, P, h, w
    centre = gauss.amax(1, keepdim=True) if boxes.shape[1] else gauss.new_zeros(boxes.shape[0], 1, h, w)
    size_map = boxes.new_zeros(boxes.shape[0], 2, h, w)
    offset_map = boxes.new_zeros(boxes.shape[0], 2, h, w)
    mask = torch.zeros(boxes.shape[0], 1, h, w, dtype=torch.bool, device=boxes.device)
    for p in range(boxes.shape[1]):
        here = (dx[:, p : p + 1] == 0) & (dy[:, p : p + 1] == 0) & valid[:, p, None, None, None]  # N,1,h,w
        size_map = torch.where(here, size[:, p, :, None, None], size_map)  # N, 2, h, w
        offset_map = torch.where(here, (cells - cell)[:, p, :, None, None], offset_map)
        mask = mask | here
    return CentreTargets(centre, size_map, offset_map, mask.to(boxes.dtype))


def decode_people(
    centre: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    max_people: int = 2,
    threshold: float = 0.3,
    stride: int = DETECT_STRIDE,
) -> People:
    """Detect maps (:class:`DetectOutputs` fields, ``(N, 1|2, h, w)``) -> the ``max_people`` best
    :class:`People` per image: local maxima of ``centre`` (3x3 max-pool NMS), boxes in input pixels."""
    n, _, h, w = centre.shape
    peaks = centre * (F.max_pool2d(centre, 3, 1, 1) == centre)  # N, 1, h, w: non-maxima zeroed
    k = min(max_people, h * w)
    scores, index = peaks.reshape(n, h * w).topk(k, dim=1)  # N, K
    gather = index.unsqueeze(1).expand(n, 2, k)  # N, 2, K
    sizes = size.reshape(n, 2, h * w).gather(2, gather) * stride  # N, 2, K: (w, h) pixels
    offsets = offset.reshape(n, 2, h * w).gather(2, gather)  # N, 2, K
    cells = torch.stack((index % w, index // w), dim=1).to(centre.dtype)  # N, 2, K: (x, y)
    centres = (cells + offsets) * stride - 0.5  # N, 2, K: pixel-centre convention
    boxes = torch.cat((centres, sizes), dim=1).transpose(1, 2)  # N, K, 4
    return People(boxes, scores, scores >= threshold)


# ---- loss ----------------------------------------------------------------------------------------


def focal_loss(
    centre_logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over ``(N, 1, h, w)`` maps, summed and divided by the
    number of centres (cells where ``target == 1``). Computed from logits for stability."""
    pos = (target == 1).to(centre_logits.dtype)
    prob = torch.sigmoid(centre_logits)
    pos_loss = F.logsigmoid(centre_logits) * (1 - prob) ** alpha * pos
    neg_loss = F.logsigmoid(-centre_logits) * prob**alpha * (1 - target) ** gamma * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


@dataclass(frozen=True)
class DetectLossWeights:
    """CenterNet's weights: centre focal loss 1, size L1 0.1, offset L1 1."""

    centre: float = 1.0
    size: float = 0.1
    offset: float = 1.0


def detect_loss(
    outputs: DetectOutputs, targets: CentreTargets, weights: DetectLossWeights | None = None
) -> dict[str, torch.Tensor]:
    """Person-localisation loss terms and ``total``: :func:`focal_loss` on the centres, L1 on sizes
    (cells) and offsets at the centre cells, each divided by the number of people."""
    weights = weights or DetectLossWeights()
    people = targets.mask.sum().clamp(min=1.0)
    centre = focal_loss(outputs.centre_logits, targets.centre)
    size = ((outputs.size - targets.size).abs() * targets.mask).sum() / people
    offset = ((outputs.offset - targets.offset).abs() * targets.mask).sum() / people
    total = weights.centre * centre + weights.size * size + weights.offset * offset
    return {"centre": centre, "size": size, "offset": offset, "total": total}
