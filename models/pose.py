"""An HRNet-like 2D/3D pose estimator and person localiser for the 25 NTU joints.

The backbone is HRNet's (Sun et al., CVPR 2019): a stem of two stride-2 3x3 convolutions (input ->
1/4), bottleneck blocks at 1/4 (HRNet's ``layer1``), then stages that each add one lower-resolution
branch (1/4, 1/8, 1/16, 1/32) and repeat modules of basic residual blocks per branch followed by a
multi-scale fusion: each branch receives the sum of all branches resampled to it (strided 3x3
convolutions down, 1x1 convolution + nearest upsampling up). Two heads read it:

- keypoints (:meth:`PoseEstimator.forward`, on person crops): the fused 1/4 branch gives 25 heatmaps
  (trained against gaussians peaking at 1) and VNect-style location maps (X, Y, Z per joint,
  root-relative metres). A soft-argmax (integral regression) over ``beta * heatmap`` gives
  differentiable 2D coordinates, and its per-joint weights read the location maps out into 3D joints.
- people (:meth:`PoseEstimator.detect`, on full frames): CenterNet-style heads on a fused 1/8 branch
  give a person-centre heatmap, box sizes and sub-cell offsets; :func:`decode_people` finds up to K
  people with a 3x3 max-pool NMS. By default (``PoseConfig.detector = "separate"``) that branch is a
  small 2-branch HRNet of its own, as top-down pose systems pair a keypoint network with a detector:
  sharing the keypoint backbone let the frame-level gradients and BN statistics compete with the
  keypoints' (training the small model with one detector frame per step instead of four, so noisier
  person gradients, cost 0.07-0.12 held-out PCK@0.2 at equal epochs). Its step costs about what the
  shared heads' did on 2 CPU cores (256x160 frames). ``"shared"`` keeps one network.

Conventions (every function here uses them):

- images ``(N, 3, H, W)``: RGB in [0, 1] minus ImageNet mean over std (:func:`normalise_images`), H
  and W multiples of ``PoseConfig.input_multiple`` (32 with 4 branches, 16 with 3);
- pixel coordinates ``(x, y)`` are pixel-centre based: pixel ``i`` spans ``[i - 0.5, i + 0.5]``, so
  a horizontal mirror maps ``x`` to ``W - 1 - x``. Heatmap pixel ``i`` covers input pixels
  ``4i .. 4i + 3``, hence ``input = 4 * heatmap + 1.5`` (:func:`heatmap_to_input`); with it, mirrored
  heatmaps decode exactly to mirrored coordinates (no HRNet-style one-pixel shift in flip tests);
- 3D joints: camera axes (X right, Y up, Z away from the camera) in metres, relative to the root
  joint (spine_middle), so a horizontal mirror negates X;
- joints in NTU order (``models.skeleton.JOINT_NAMES``); ``FLIP_INDEX`` swaps left and right.

Tensors stay at rank 4 or below and there is no ``einsum``; both paths export to ONNX through
:class:`PoseGraph`. Weights are initialised as HRNet does (convolutions normal with std 0.001, BN
weight 1, bias 0); nothing is pre-trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.skeleton import FLIP_INDEX, NUM_JOINTS, SPINE_MIDDLE

KEYPOINT_STRIDE = 4  # heatmaps and location maps: 1/4 of the input
DETECT_STRIDE = 8  # person centres: 1/8 of the input
ROOT_JOINT = SPINE_MIDDLE  # joints3d are relative to it
IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB; the usual ImageNet statistics, although nothing is pre-trained
IMAGE_STD = (0.229, 0.224, 0.225)
CENTRE_PRIOR_BIAS = -2.19  # CenterNet: sigmoid(-2.19) = 0.1, so the focal loss starts small


@dataclass(frozen=True)
class PoseConfig:
    """Size of a :class:`PoseEstimator`; the defaults are HRNet-W32's backbone.

    ``full`` has ~28.7 M parameters: HRNet-W32 for pose has 28.5 M; the rest are the location-map
    head, the CenterNet heads and the final module's fusion into the 1/8 branch for them.
    """

    stem_width: int = 64  # channels of the two stem convolutions
    stem_blocks: int = 4  # bottleneck blocks at 1/4 after the stem; they output 4 * stem_width channels
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of the 1/4, 1/8, 1/16, 1/32 branches
    stage_modules: tuple[int, ...] = (1, 4, 3)  # modules per stage; stage s runs branches 0..s+1
    stage_blocks: tuple[int, ...] = (4, 4, 4)  # basic blocks per branch in each module of a stage
    detect_width: int = 64  # hidden channels of each CenterNet head
    # "separate": the person heads read their own 2-branch HRNet (widths ``detect_widths``) so the
    # frame-level task does not share weights or BN statistics with the keypoints; "shared": they read
    # the keypoint backbone's 1/8 branch (one network, but its gradients compete with the keypoints')
    detector: str = "separate"
    detect_widths: tuple[int, int] = (32, 64)
    input_size: tuple[int, int] = (256, 256)  # (H, W) of the person crops the model is trained on
    sigma: float = 2.0  # std of the gaussian heatmap targets, heatmap pixels
    beta: float = 16.0  # soft-argmax sharpness for heatmaps peaking at 1 (suits sigma 2: < 0.03 px bias)

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ValueError("PoseConfig: widths needs at least 2 branches (the detect head reads 1/8)")
        stages = len(self.widths) - 1
        if len(self.stage_modules) != stages or len(self.stage_blocks) != stages:
            raise ValueError(
                f"PoseConfig: stage_modules and stage_blocks need one entry per added branch ({stages}); "
                f"got {len(self.stage_modules)} and {len(self.stage_blocks)}"
            )
        if self.detector not in ("separate", "shared") or len(self.detect_widths) != 2:
            raise ValueError(
                f"PoseConfig: detector must be 'separate' or 'shared' (got {self.detector!r}) and "
                f"detect_widths two widths (got {self.detect_widths})"
            )
        counts = (
            self.stem_width,
            *self.widths,
            *self.stage_modules,
            *self.stage_blocks,
            self.detect_width,
            *self.detect_widths,
        )
        if min(counts) < 1 or self.stem_blocks < 0:
            raise ValueError("PoseConfig: widths, modules and blocks must be positive")
        if any(s % self.input_multiple for s in self.input_size):
            raise ValueError(
                f"PoseConfig: input_size {self.input_size} must be multiples of {self.input_multiple}"
            )

    def detector_config(self) -> PoseConfig:
        """The separate detector's backbone: a stem, one bottleneck and one 2-branch module."""
        w0, w1 = self.detect_widths
        return PoseConfig(
            stem_width=w0,
            stem_blocks=1,
            widths=(w0, w1),
            stage_modules=(1,),
            stage_blocks=(2,),
            detect_width=self.detect_width,
            detector="shared",
            detect_widths=self.detect_widths,
            input_size=(64, 64),  # unused: frames only need H and W multiples of 8
        )

    @property
    def input_multiple(self) -> int:
        """H and W must be multiples of this: the stride of the lowest-resolution branch."""
        return KEYPOINT_STRIDE * 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PoseConfig:
        d = {"detector": "shared", **d}  # configs saved before the field existed had shared heads
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


POSE_SIZES = {
    "full": {},
    # CPU size: trains on 2 cores in minutes (~0.80 M parameters, 0.35 M of them the detector; crops
    # 128x128 by default, 96x96 from pose_data.crop_size in the DAG)
    "small": dict(
        stem_width=32,
        stem_blocks=1,
        widths=(16, 32, 64),
        stage_modules=(1, 2),
        stage_blocks=(2, 1),
        detect_width=32,
        input_size=(128, 128),
    ),
}


def pose_config_for(size: str, **overrides) -> PoseConfig:
    """The named size (``full`` | ``small``), with any field overridden."""
    if size not in POSE_SIZES:
        raise ValueError(f"unknown pose model size {size!r}; valid: {', '.join(POSE_SIZES)}")
    return PoseConfig(**{**POSE_SIZES[size], **overrides})


# ---- building blocks --------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet's basic block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout, relu=False))
        self.skip = nn.Identity() if cin == cout else _conv_bn(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (``4 * planes`` out) with a residual connection (HRNet's ``layer1`` block)."""

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = 4 * planes
        self.body = nn.Sequential(
            _conv_bn(cin, planes, 1), _conv_bn(planes, planes), _conv_bn(planes, cout, 1, relu=False)
        )
        self.skip = nn.Identity() if cin == cout else _conv_bn(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def _resample(cin: int, cout: int, steps: int) -> nn.Module:
    """Fusion path from a branch ``steps`` levels away: ``steps > 0`` goes down (``steps`` strided 3x3
    convolutions, ReLU between them), ``steps < 0`` goes up (1x1 convolution, BN, nearest upsampling)."""
    if steps < 0:
        return nn.Sequential(_conv_bn(cin, cout, 1, relu=False), nn.Upsample(scale_factor=2**-steps))
    layers = [_conv_bn(cin, cin, stride=2) for _ in range(steps - 1)]
    return nn.Sequential(*layers, _conv_bn(cin, cout, stride=2, relu=False))


class HRModule(nn.Module):
    """Basic blocks on every branch, then the fusion into the branches ``0 .. fused - 1``."""

    def __init__(self, widths: tuple[int, ...], blocks: int, fused: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(blocks)]) for c in widths
        )
        self.fuse = nn.ModuleList(
            nn.ModuleList(
                nn.Identity() if j == i else _resample(widths[j], widths[i], i - j)
                for j in range(len(widths))
            )
            for i in range(fused)
        )

    def forward(self, xs: list[torch.Tensor], targets: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """Branches ``[(N, C_b, H/2^b, W/2^b)]`` -> the fused branches ``targets`` (default: all fused)."""
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        targets = range(len(self.fuse)) if targets is None else targets
        out = []
        for i in targets:
            total = xs[i]
            for j, path in enumerate(self.fuse[i]):
                if j != i:
                    total = total + path(xs[j])  # N, C_i, H_i, W_i
            out.append(F.relu(total))
        return out


class Transition(nn.Module):
    """Into a stage: adapts the existing branches' widths and adds the next lower-resolution branch."""

    def __init__(self, previous: tuple[int, ...], widths: tuple[int, ...]):
        super().__init__()
        self.adapt = nn.ModuleList(
            nn.Identity() if p == c else _conv_bn(p, c) for p, c in zip(previous, widths, strict=False)
        )
        self.new = _conv_bn(previous[-1], widths[-1], stride=2)  # from the lowest-resolution branch

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [adapt(x) for adapt, x in zip(self.adapt, xs, strict=False)] + [self.new(xs[-1])]


class HRNetBackbone(nn.Module):
    """Images ``(N, 3, H, W)`` -> one fused branch ``b``: ``(N, widths[b], H / 4 / 2^b, W / 4 / 2^b)``.

    The last module fuses only the branch asked for (HRNet's ``multi_scale_output=False``), so the
    keypoint path (branch 0) and the detect path (branch 1) each compute one fusion output.
    """

    def __init__(self, cfg: PoseConfig):
        super().__init__()
        s = cfg.stem_width
        self.stem = nn.Sequential(_conv_bn(3, s, stride=2), _conv_bn(s, s, stride=2))  # N, S, H/4, W/4
        blocks = [Bottleneck(s if i == 0 else 4 * s, s) for i in range(cfg.stem_blocks)]
        self.layer1 = nn.Sequential(*blocks)
        previous = (4 * s if blocks else s,)
        self.transitions, self.stages = nn.ModuleList(), nn.ModuleList()
        for k, (modules, nblocks) in enumerate(zip(cfg.stage_modules, cfg.stage_blocks, strict=True)):
            widths = cfg.widths[: k + 2]
            last_stage = k == len(cfg.stage_modules) - 1
            self.transitions.append(Transition(previous, widths))
            fused = [len(widths)] * modules
            if last_stage:
                fused[-1] = 2  # the final module fuses branch 0 or 1 only, whichever is asked for
            stage = [HRModule(widths, nblocks, f) for f in fused]
            if last_stage:
                self.final = stage.pop()
            self.stages.append(nn.ModuleList(stage))
            previous = widths

    def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        xs = [self.layer1(self.stem(x))]  # [N, C, H/4, W/4]
        for transition, stage in zip(self.transitions, self.stages, strict=True):
            xs = transition(xs)  # one more branch: [N, C_b, H/4/2^b, W/4/2^b]
            for module in stage:
                xs = module(xs)
        return self.final(xs, (branch,))[0]  # N, C_branch, H/4/2^branch, W/4/2^branch


def _head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """CenterNet's output head: 3x3 convolution, ReLU, 1x1 convolution."""
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1))


# ---- outputs ----------------------------------------------------------------------------------


class PoseOutputs(NamedTuple):
    """Keypoint outputs for ``N`` crops of ``(H, W)`` pixels (``h, w = H / 4, W / 4``)."""

    heatmaps: torch.Tensor  # N, 25, h, w: ~ gaussians peaking at 1 where a joint is
    coords2d: torch.Tensor  # N, 25, 2: (x, y) input pixels, pixel-centre convention
    joints3d: torch.Tensor  # N, 25, 3: (X, Y, Z) metres relative to ROOT_JOINT (exactly 0 there)
    confidence: torch.Tensor  # N, 25: heatmap peak clamped to [0, 1]
    location_maps: torch.Tensor  # N, 75, h, w: channel c * 25 + j is component c (X, Y, Z) of joint j


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


def _check_images(x: torch.Tensor, multiple: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"expected normalised images (N, 3, H, W) with H and W multiples of {multiple}; got "
            f"{tuple(x.shape)}. Resize or pad the crops/frames (see normalise_images)."
        )


class PoseEstimator(nn.Module):
    """HRNet-like backbone with keypoint heads (:meth:`forward`) and person heads (:meth:`detect`)."""

    def __init__(self, cfg: PoseConfig):
        super().__init__()
        self.cfg = cfg
        c0, c1 = cfg.widths[0], cfg.widths[1]
        self.backbone = HRNetBackbone(cfg)
        self.detect_backbone = None  # "shared": the person heads read self.backbone
        if cfg.detector == "separate":
            self.detect_backbone = HRNetBackbone(cfg.detector_config())
            c1 = cfg.detect_widths[1]
        self.heatmap_head = nn.Conv2d(c0, NUM_JOINTS, 1)  # HRNet's final layer
        self.location_head = nn.Sequential(_conv_bn(c0, c0), nn.Conv2d(c0, 3 * NUM_JOINTS, 1))
        self.centre_head = _head(c1, cfg.detect_width, 1)
        self.size_head = _head(c1, cfg.detect_width, 2)
        self.offset_head = _head(c1, cfg.detect_width, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.centre_head[-1].bias, CENTRE_PRIOR_BIAS)

    def forward(self, crops: torch.Tensor) -> PoseOutputs:
        """Normalised person crops ``(N, 3, H, W)`` -> :class:`PoseOutputs` (heatmaps at ``H/4, W/4``)."""
        _check_images(crops, self.cfg.input_multiple)
        features = self.backbone(crops, branch=0)  # N, C0, H/4, W/4
        return keypoint_outputs(self.heatmap_head(features), self.location_head(features), self.cfg.beta)

    def detect(self, frames: torch.Tensor) -> DetectOutputs:
        """Normalised full frames ``(N, 3, H, W)`` -> :class:`DetectOutputs` at ``H/8, W/8``."""
        _check_images(frames, self.cfg.input_multiple)
        features = (self.detect_backbone or self.backbone)(frames, branch=1)  # N, C1, H/8, W/8
        logits = self.centre_head(features)  # N, 1, H/8, W/8
        return DetectOutputs(
            torch.sigmoid(logits), self.size_head(features), self.offset_head(features), logits
        )


EXPORT_OUTPUTS = {
    "keypoints": ("heatmaps", "coords2d", "joints3d", "confidence"),
    "detect": ("centre", "size", "offset"),
}


class PoseGraph(nn.Module):
    """One path of a :class:`PoseEstimator` with plain tuple outputs, for ONNX export.

    ``task="keypoints"``: crops -> ``EXPORT_OUTPUTS["keypoints"]``; ``task="detect"``: frames ->
    ``EXPORT_OUTPUTS["detect"]``. Shapes as in :class:`PoseOutputs` / :class:`DetectOutputs`.
    Puts ``model`` in eval mode: the exporter restores the wrapper's mode afterwards, and a wrapper
    left in training mode would switch the model's BatchNorm back to batch statistics.
    """

    def __init__(self, model: PoseEstimator, task: str):
        super().__init__()
        if task not in EXPORT_OUTPUTS:
            raise ValueError(f"unknown export task {task!r}; valid: {', '.join(EXPORT_OUTPUTS)}")
        self.model, self.task = model, task
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.task == "keypoints":
            return tuple(self.model(x)[: len(EXPORT_OUTPUTS["keypoints"])])
        return tuple(self.model.detect(x)[: len(EXPORT_OUTPUTS["detect"])])


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


# ---- losses -----------------------------------------------------------------------------------


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


# ---- images -----------------------------------------------------------------------------------


def normalise_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 BGR images ``(H, W, 3)`` or ``(N, H, W, 3)`` (OpenCV layout) -> float32 ``(N, 3, H, W)``:
    RGB, divided by 255, minus ``IMAGE_MEAN``, over ``IMAGE_STD``. Tensors stay on their device."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(
            f"normalise_images expects uint8 BGR images (H, W, 3) or (N, H, W, 3); got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    x = x.unsqueeze(0) if x.dim() == 3 else x  # N, H, W, 3 (BGR)
    x = x.flip(-1).permute(0, 3, 1, 2).float() / 255.0  # N, 3 (RGB), H, W
    mean = torch.tensor(IMAGE_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


__all__ = [
    "DETECT_STRIDE",
    "EXPORT_OUTPUTS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "KEYPOINT_STRIDE",
    "POSE_SIZES",
    "ROOT_JOINT",
    "CentreTargets",
    "DetectLossWeights",
    "DetectOutputs",
    "People",
    "PoseConfig",
    "PoseEstimator",
    "PoseGraph",
    "PoseLossWeights",
    "PoseOutputs",
    "PoseTargets",
    "centre_targets",
    "decode_people",
    "detect_loss",
    "flip_coords",
    "flip_heatmaps",
    "flip_images",
    "flip_joints3d",
    "flip_location_maps",
    "flip_outputs",
    "focal_loss",
    "gaussian_heatmaps",
    "gaussian_radius",
    "heatmap_to_input",
    "input_to_heatmap",
    "keypoint_outputs",
    "normalise_images",
    "pose_config_for",
    "pose_loss",
    "pose_targets",
    "read_location_maps",
    "soft_argmax",
]
