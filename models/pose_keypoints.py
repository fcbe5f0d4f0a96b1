"""The keypoint side of :mod:`models.pose`: heatmaps, soft-argmax, location maps, flips and the loss.

Conventions as in :mod:`models.pose`: pixel coordinates are pixel-centre based, heatmaps are 1/4 of
the crop (``input = 4 * heatmap + 1.5``, :func:`heatmap_to_input`), 3D joints are root-relative
camera-axis metres, and ``FLIP_INDEX`` swaps left and right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from models.skeleton import FLIP_INDEX, NUM_JOINTS, SPINE_MIDDLE

if TYPE_CHECKING:
    from models.pose import PoseConfig

KEYPOINT_STRIDE = 4  # heatmaps and location maps: 1/4 of the input
ROOT_JOINT = SPINE_MIDDLE  # joints3d are relative to it


class PoseOutputs(NamedTuple):
    """Keypoint outputs for ``N`` crops of ``(H, W)`` pixels (``h, w = H / 4, W / 4``)."""

    heatmaps: torch.Tensor  # N, 25, h, w: ~ gaussians peaking at 1 where a joint is
    coords2d: torch.Tensor  # N, 25, 2: (x, y) input pixels, pixel-centre convention
    joints3d: torch.Tensor  # N, 25, 3: (X, Y, Z) metres relative to ROOT_JOINT (exactly 0 there)
    confidence: torch.Tensor  # N, 25: heatmap peak clamped to [0, 1]
    location_maps: torch.Tensor  # N, 75, h, w: channel c * 25 + j is component c (X, Y, Z) of joint j


# ---- keypoint maths ---------------------------------------------------------------------------


def soft_argmax(heatmaps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integral regression: ``(N, J, h, w)`` -> coordinates ``(N, J, 2)`` and weights ``(N, J, h, w)``.

    The weights are ``softmax(beta * heatmap)`` over each map's pixels; the coordinates are their
    expected ``(x, y)`` in heatmap pixels (pixel centres at integers). For heatmaps peaking at 1,
    ``beta`` must make the peak outweigh the ``h * w`` background pixels (see ``PoseConfig.beta``);
    for log-probability maps use ``beta = 1``.
    """
    n, j, h, w = heatmaps.shape
    weights = torch.softmax(beta * heatmaps.reshape(n, j, h * w), dim=-1).reshape(n, j, h, w)
    xs = torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device)
    ys = torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device)
    x = (weights.sum(2) * xs).sum(-1)  # N, J (column marginal . column index)
    y = (weights.sum(3) * ys).sum(-1)  # N, J
    return torch.stack((x, y), dim=-1), weights


def gaussian_heatmaps(coords: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Target maps ``(N, J, h, w)``: ``exp(-d^2 / 2 sigma^2)`` around sub-pixel ``coords`` ``(N, J, 2)``.

    ``coords`` and ``sigma`` are in heatmap pixels; the peak is 1 only when a centre is on a pixel.
    """
    h, w = size
    xs = torch.arange(w, dtype=coords.dtype, device=coords.device)
    ys = torch.arange(h, dtype=coords.dtype, device=coords.device)
    gx = torch.exp(-((xs - coords[..., 0:1]) ** 2) / (2 * sigma**2))  # N, J, w
    gy = torch.exp(-((ys - coords[..., 1:2]) ** 2) / (2 * sigma**2))  # N, J, h
    return gy.unsqueeze(-1) * gx.unsqueeze(-2)  # N, J, h, w


def heatmap_to_input(coords: torch.Tensor, stride: int = KEYPOINT_STRIDE) -> torch.Tensor:
    """Heatmap pixels -> input pixels (both pixel-centre based): ``stride * c + (stride - 1) / 2``."""
    return coords * stride + (stride - 1) / 2


def input_to_heatmap(coords: torch.Tensor, stride: int = KEYPOINT_STRIDE) -> torch.Tensor:
    """Input pixels -> heatmap pixels; the inverse of :func:`heatmap_to_input`."""
    return (coords - (stride - 1) / 2) / stride


def read_location_maps(maps: torch.Tensor, weights: torch.Tensor, root: int = ROOT_JOINT) -> torch.Tensor:
    """Location maps ``(N, 3J, h, w)`` read with soft-argmax ``weights`` ``(N, J, h, w)`` -> ``(N, J, 3)``.

    Each joint's ``(X, Y, Z)`` is the weighted sum over pixels of its three maps, minus the root's.
    """
    n, j, h, w = weights.shape
    values = maps.reshape(n, 3, j, h * w) * weights.reshape(n, 1, j, h * w)  # N, 3, J, h*w
    joints = values.sum(-1)  # N, 3, J
    joints = joints - joints[:, :, root : root + 1]  # the root at exactly 0
    return joints.transpose(1, 2)  # N, J, 3


def keypoint_outputs(heatmaps: torch.Tensor, location_maps: torch.Tensor, beta: float) -> PoseOutputs:
    """Heatmaps ``(N, J, h, w)`` and location maps ``(N, 3J, h, w)`` of crops -> :class:`PoseOutputs`.

    Used by the model and for flip-test averaging: average ``heatmaps`` and ``location_maps`` with
    their flipped-back counterparts (:func:`flip_heatmaps`, :func:`flip_location_maps`), call this.
    """
    coords, weights = soft_argmax(heatmaps, beta)
    confidence = heatmaps.flatten(2).amax(-1).clamp(0.0, 1.0)  # N, J
    joints3d = read_location_maps(location_maps, weights)
    return PoseOutputs(heatmaps, heatmap_to_input(coords), joints3d, confidence, location_maps)


# ---- horizontal flips ---------------------------------------------------------------------------


def _flip_index(device: torch.device) -> torch.Tensor:
    return torch.tensor(FLIP_INDEX, dtype=torch.long, device=device)


def flip_images(images: torch.Tensor) -> torch.Tensor:
    """Mirror images ``(N, C, H, W)`` left-right."""
    return images.flip(-1)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes ``(N, 4)`` x0 y0 x1 y1 in pixels of an image ``width`` wide -> the mirror's boxes
    (``x -> width - 1 - x``; NaN boxes stay NaN)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((width - 1) - x1, y0, (width - 1) - x0, y1), dim=-1)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``(N, 4)`` x0 y0 x1 y1 (pixels, closed: a pixel counts when its centre lies inside) ->
    masks ``(N, 1, height, width)``, 1 inside and 0 outside. A NaN box (or one with ``x1 < x0``) is an
    empty mask: comparisons with NaN are false, in PyTorch and in ONNX alike."""
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype).reshape(1, 1, height, 1)
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype).reshape(1, 1, 1, width)
    x0, y0, x1, y1 = (boxes[:, k].reshape(-1, 1, 1, 1) for k in range(4))
    return ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).to(boxes.dtype)


def flip_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Heatmaps ``(N, J, h, w)`` of an image -> those of its mirror: mirrored, joints swapped."""
    return heatmaps.flip(-1).index_select(1, _flip_index(heatmaps.device))


def flip_location_maps(maps: torch.Tensor) -> torch.Tensor:
    """Location maps ``(N, 3J, h, w)`` -> those of the mirrored image: mirrored, joints swapped, X negated."""
    j = NUM_JOINTS
    index = torch.cat([c * j + _flip_index(maps.device) for c in range(3)])
    sign = torch.ones(3 * j, dtype=maps.dtype, device=maps.device)
    sign[:j] = -1.0
    return maps.flip(-1).index_select(1, index) * sign.reshape(1, 3 * j, 1, 1)


def flip_coords(coords: torch.Tensor, width: int) -> torch.Tensor:
    """2D joints ``(N, J, 2)`` in pixels of an image ``width`` wide -> the mirror's joints
    (``x -> width - 1 - x``, left/right swapped)."""
    x = (width - 1) - coords[..., 0]
    return torch.stack((x, coords[..., 1]), dim=-1).index_select(-2, _flip_index(coords.device))


def flip_joints3d(joints: torch.Tensor) -> torch.Tensor:
    """3D joints ``(N, J, 3)`` -> those of the mirrored person: ``X -> -X``, left/right swapped."""
    sign = torch.tensor([-1.0, 1.0, 1.0], dtype=joints.dtype, device=joints.device)
    return (joints * sign).index_select(-2, _flip_index(joints.device))


def flip_outputs(out: PoseOutputs) -> PoseOutputs:
    """Outputs for a mirrored crop -> outputs for the crop (or vice versa); the width comes from
    the heatmaps. Flip test: average ``model(x)`` with ``flip_outputs(model(flip_images(x)))``."""
    width = out.heatmaps.shape[-1] * KEYPOINT_STRIDE
    return PoseOutputs(
        flip_heatmaps(out.heatmaps),
        flip_coords(out.coords2d, width),
        flip_joints3d(out.joints3d),
        out.confidence.index_select(1, _flip_index(out.confidence.device)),
        flip_location_maps(out.location_maps),
    )


# ---- loss ----------------------------------------------------------------------------------------


class PoseTargets(NamedTuple):
    """Keypoint training targets for ``N`` crops."""

    heatmaps: torch.Tensor  # N, J, h, w: gaussian_heatmaps of the 2D joints
    coords2d: torch.Tensor  # N, J, 2: input pixels
    visible: torch.Tensor  # N, J: 1 where the 2D joint is labelled and inside the crop
    joints3d: torch.Tensor  # N, J, 3: metres relative to ROOT_JOINT
    has3d: torch.Tensor  # N: 1 where joints3d is known


def pose_targets(
    coords2d: torch.Tensor,
    visible: torch.Tensor,
    cfg: PoseConfig,
    joints3d: torch.Tensor | None = None,
    input_size: tuple[int, int] | None = None,
) -> PoseTargets:
    """:class:`PoseTargets` from 2D joints ``(N, J, 2)`` (input pixels), ``visible`` ``(N, J)`` and
    optional 3D joints ``(N, J, 3)`` (metres, made root-relative here). ``input_size`` defaults to
    ``cfg.input_size``."""
    h, w = input_size or cfg.input_size
    size = (h // KEYPOINT_STRIDE, w // KEYPOINT_STRIDE)
    heatmaps = gaussian_heatmaps(input_to_heatmap(coords2d), size, cfg.sigma)
    n = coords2d.shape[0]
    if joints3d is None:
        joints3d, has3d = coords2d.new_zeros(n, NUM_JOINTS, 3), coords2d.new_zeros(n)
    else:
        joints3d, has3d = joints3d - joints3d[:, ROOT_JOINT : ROOT_JOINT + 1], coords2d.new_ones(n)
    return PoseTargets(heatmaps, coords2d, visible.to(coords2d.dtype), joints3d, has3d)


@dataclass(frozen=True)
class PoseLossWeights:
    """Weights of :func:`pose_loss`'s terms (starting points: each term is a few units at the start)."""

    heatmap: float = 1.0
    coords: float = 0.1
    joints3d: float = 10.0


def pose_loss(
    outputs: PoseOutputs, targets: PoseTargets, weights: PoseLossWeights | None = None
) -> dict[str, torch.Tensor]:
    """Keypoint loss terms and their weighted ``total`` (scalars).

    - ``heatmap``: squared error summed over each heatmap's pixels, mean over visible joints (a
      missed peak costs ``pi * sigma^2``, ~12.6 at sigma 2, independent of the heatmap size);
    - ``coords``: L1 of ``coords2d`` in input pixels, mean over visible joints and x/y;
    - ``joints3d``: L1 in metres, mean over joints and X/Y/Z of the crops with ``has3d``.
    """
    weights = weights or PoseLossWeights()
    visible = targets.visible  # N, J
    n_visible = visible.sum().clamp(min=1.0)
    heat = ((outputs.heatmaps - targets.heatmaps) ** 2).flatten(2).sum(-1)  # N, J
    heatmap = (heat * visible).sum() / n_visible
    coords = ((outputs.coords2d - targets.coords2d).abs().mean(-1) * visible).sum() / n_visible
    err3d = (outputs.joints3d - targets.joints3d).abs().mean((1, 2))  # N
    joints3d = (err3d * targets.has3d).sum() / targets.has3d.sum().clamp(min=1.0)
    total = weights.heatmap * heatmap + weights.coords * coords + weights.joints3d * joints3d
    return {"heatmap": heatmap, "coords": coords, "joints3d": joints3d, "total": total}
