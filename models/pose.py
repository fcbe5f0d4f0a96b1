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

The pieces: :mod:`models.hrnet` (the backbone's blocks), :mod:`models.pose_keypoints` (heatmaps,
soft-argmax, location maps, flips, the keypoint loss) and :mod:`models.pose_people` (centre targets,
decoding, the person loss); this module assembles them and exports their public names.

Tensors stay at rank 4 or below and there is no ``einsum``; both paths export to ONNX through
:class:`PoseGraph`. Weights are initialised as HRNet does (convolutions normal with std 0.001, BN
weight 1, bias 0); nothing is pre-trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.hrnet import HRNetBackbone, conv_bn, output_head
from models.pose_keypoints import (
    KEYPOINT_STRIDE,
    ROOT_JOINT,
    PoseLossWeights,
    PoseOutputs,
    PoseTargets,
    box_masks,
    flip_boxes,
    flip_coords,
    flip_heatmaps,
    flip_images,
    flip_joints3d,
    flip_location_maps,
    flip_outputs,
    gaussian_heatmaps,
    heatmap_to_input,
    input_to_heatmap,
    keypoint_outputs,
    pose_loss,
    pose_targets,
    read_location_maps,
    soft_argmax,
)
from models.pose_people import (
    DETECT_STRIDE,
    CentreTargets,
    DetectLossWeights,
    DetectOutputs,
    People,
    centre_targets,
    decode_people,
    detect_loss,
    focal_loss,
    gaussian_radius,
)
from models.skeleton import NUM_JOINTS

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
    # The keypoint network also reads the other person's box in the crop as a 4th input channel (a
    # 0/1 mask; empty when the crop's person is alone), so that where two performers overlap it is
    # told which body is not its target (:meth:`PoseEstimator.forward`)
    other_person: bool = False
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
            other_person=False,
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
    # CPU size: 16 epochs train on 2 cores in 55-65 minutes (~1.31 M parameters, 0.35 M of them the
    # detector; crops 128x128, as pose_data.crop_size makes them in the DAG). The 4th, 1/32 branch
    # sees the whole crop (4x4 cells): held-out PCK@0.2 0.843 -> 0.856 at 6 epochs for 10% speed.
    "small": dict(
        stem_width=32,
        stem_blocks=1,
        widths=(16, 32, 64, 128),
        stage_modules=(1, 2, 1),
        stage_blocks=(2, 1, 1),
        detect_width=32,
        input_size=(128, 128),
    ),
}


def pose_config_for(size: str, **overrides) -> PoseConfig:
    """The named size (``full`` | ``small``), with any field overridden."""
    if size not in POSE_SIZES:
        raise ValueError(f"unknown pose model size {size!r}; valid: {', '.join(POSE_SIZES)}")
    return PoseConfig(**{**POSE_SIZES[size], **overrides})


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
        self.location_head = nn.Sequential(conv_bn(c0, c0), nn.Conv2d(c0, 3 * NUM_JOINTS, 1))
        self.centre_head = output_head(c1, cfg.detect_width, 1)
        self.size_head = output_head(c1, cfg.detect_width, 2)
        self.offset_head = output_head(c1, cfg.detect_width, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.centre_head[-1].bias, CENTRE_PRIOR_BIAS)

    def forward(self, crops: torch.Tensor, other: torch.Tensor | None = None) -> PoseOutputs:
        """Normalised person crops ``(N, 3, H, W)`` -> :class:`PoseOutputs` (heatmaps at ``H/4, W/4``).

        ``other`` ``(N, 4)``: with ``cfg.other_person``, the box (x0 y0 x1 y1, crop pixels) of the
        other person in each crop, NaN where there is none (``None``: nobody else in any crop); the
        network reads it as a mask channel (:func:`box_masks`). Ignored without ``other_person``.
        """
        _check_images(crops, self.cfg.input_multiple)
        if self.cfg.other_person:
            if other is None:
                other = crops.new_full((crops.shape[0], 4), float("nan"))
            if other.dim() != 2 or other.shape != (crops.shape[0], 4):
                raise ValueError(
                    f"other boxes must be (N, 4) for {crops.shape[0]} crops; got {tuple(other.shape)}"
                )
            masks = box_masks(other.to(crops.dtype), crops.shape[2], crops.shape[3])
            crops = torch.cat([crops, masks], dim=1)  # N, 4, H, W
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

    ``task="keypoints"``: crops (and, with ``other_person``, the other boxes) ->
    ``EXPORT_OUTPUTS["keypoints"]``; ``task="detect"``: frames ->
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

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.task == "keypoints":
            return tuple(self.model(x, other)[: len(EXPORT_OUTPUTS["keypoints"])])
        return tuple(self.model.detect(x)[: len(EXPORT_OUTPUTS["detect"])])


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
    "box_masks",
    "centre_targets",
    "decode_people",
    "detect_loss",
    "flip_boxes",
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
