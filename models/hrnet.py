"""HRNet's building blocks (Sun et al., CVPR 2019), the backbone of :mod:`models.pose`.

A stem of two stride-2 3x3 convolutions (input -> 1/4), bottleneck blocks at 1/4 (HRNet's ``layer1``),
then stages that each add one lower-resolution branch (:class:`Transition`) and repeat
:class:`HRModule` modules: basic residual blocks per branch followed by a multi-scale fusion, in which each
branch receives the sum of all branches resampled to it (strided 3x3 convolutions down, 1x1
convolution + nearest upsampling up). :func:`output_head` is CenterNet's output head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from models.pose import PoseConfig


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Convolution without bias ("same" padding), BatchNorm, then ReLU unless ``relu`` is False."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet's basic block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout, relu=False))
        self.skip = nn.Identity() if cin == cout else conv_bn(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (``4 * planes`` out) with a residual connection (HRNet's ``layer1`` block)."""

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = 4 * planes
        self.body = nn.Sequential(
            conv_bn(cin, planes, 1), conv_bn(planes, planes), conv_bn(planes, cout, 1, relu=False)
        )
        self.skip = nn.Identity() if cin == cout else conv_bn(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def _resample(cin: int, cout: int, steps: int) -> nn.Module:
    """Fusion path from a branch ``steps`` levels away: ``steps > 0`` goes down (``steps`` strided 3x3
    convolutions, ReLU between them), ``steps < 0`` goes up (1x1 convolution, BN, nearest upsampling)."""
    if steps < 0:
        return nn.Sequential(conv_bn(cin, cout, 1, relu=False), nn.Upsample(scale_factor=2**-steps))
    layers = [conv_bn(cin, cin, stride=2) for _ in range(steps - 1)]
    return nn.Sequential(*layers, conv_bn(cin, cout, stride=2, relu=False))


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
            nn.Identity() if p == c else conv_bn(p, c) for p, c in zip(previous, widths, strict=False)
        )
        self.new = conv_bn(previous[-1], widths[-1], stride=2)  # from the lowest-resolution branch

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [adapt(x) for adapt, x in zip(self.adapt, xs, strict=False)] + [self.new(xs[-1])]


class HRNetBackbone(nn.Module):
    """Images ``(N, 3, H, W)`` (``(N, 4, H, W)`` with ``cfg.other_person``) -> one fused branch
    ``b``: ``(N, widths[b], H / 4 / 2^b, W / 4 / 2^b)``.

    The last module fuses only the branch asked for (HRNet's ``multi_scale_output=False``), so the
    keypoint path (branch 0) and the detect path (branch 1) each compute one fusion output.
    """

    def __init__(self, cfg: PoseConfig):
        super().__init__()
        s = cfg.stem_width
        channels = 4 if cfg.other_person else 3  # RGB, and the other person's box mask when asked for
        self.stem = nn.Sequential(conv_bn(channels, s, stride=2), conv_bn(s, s, stride=2))  # N, S, H/4, W/4
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


def output_head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """CenterNet's output head: 3x3 convolution, ReLU, 1x1 convolution."""
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1))
