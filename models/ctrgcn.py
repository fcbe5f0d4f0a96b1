"""CTR-GCN (Chen et al., ICCV 2021), computed the same way with fewer, larger and export-friendly ops.

The network is the published one, block for block: channel-wise topology refinement graph
convolution over 3 adjacency subsets (identity, inward, outward) with a learned shared topology
``PA`` and per-channel refinement scaled by ``alpha``; multi-scale temporal convolution (dilated
branches, a max-pool branch and a 1x1 branch); residual connections; persons folded into the batch
and averaged before the classifier. ``convert_reference_state_dict`` loads the published code's
weights into it, and the two compute the same function (tests check it).

What differs is only how it is computed, for speed and for export:

- the subsets' 1x1 convolutions run as one convolution (``conv12`` for the relation branch on the
  time-averaged input, since a 1x1 convolution commutes with the mean over T, and ``conv3``);
- every subset's refined topology comes from one batched matmul (``alpha`` scales the small conv4
  weights rather than the large topology tensor), and the aggregations run as one batched matmul
  and a sum over subsets (no ``einsum``);
- the temporal branches' 1x1 convolutions run as one convolution, and the max-pool branch is two
  elementwise maxima (the CPU pooling kernel also computes argmax indices and is 10-28x slower);
- no tensor above rank 4 once the input ``(N, C, T, V, M)`` is folded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import features
from models.skeleton import NUM_JOINTS, adjacency_subsets

FULL_CHANNELS = (64, 64, 64, 64, 128, 128, 128, 256, 256, 256)
FULL_STRIDES = (1, 1, 1, 1, 2, 1, 1, 2, 1, 1)


@dataclass(frozen=True)
class CTRGCNConfig:
    """Size of one CTR-GCN stream; the defaults are the published model."""

    num_classes: int = 120
    in_channels: int = 3
    num_persons: int = 2
    channels: tuple[int, ...] = FULL_CHANNELS  # output channels of each TCN-GCN unit
    strides: tuple[int, ...] = FULL_STRIDES  # temporal stride of each unit
    temporal_kernel: int = 5
    dilations: tuple[int, ...] = (1, 2)
    rel_reduction: int = 8  # relation channels = in_channels // rel_reduction (8 for the input layer)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("CTRGCNConfig: channels and strides need the same, non-zero length")
        branches = len(self.dilations) + 2
        if any(c % branches for c in self.channels):
            raise ValueError(f"CTRGCNConfig: every channel count must divide into {branches} branches")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> CTRGCNConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


MODEL_SIZES = {
    "full": dict(channels=FULL_CHANNELS, strides=FULL_STRIDES),
    # CPU size: a quarter of the width, 5 units, the same two temporal downsamplings (~0.07 M parameters)
    "small": dict(channels=(16, 32, 32, 64, 64), strides=(1, 2, 1, 2, 1)),
}


def config_for(size: str, num_classes: int, **overrides) -> CTRGCNConfig:
    """The named size (``full`` | ``small``) for ``num_classes`` classes."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; valid: {', '.join(MODEL_SIZES)}")
    return CTRGCNConfig(num_classes=num_classes, **MODEL_SIZES[size], **overrides)


def _conv_init(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _bn(channels: int, scale: float = 1.0) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.constant_(bn.weight, scale)
    nn.init.zeros_(bn.bias)
    return bn


class GraphConv(nn.Module):
    """CTR-GCN's ``unit_gcn``: the sum over subsets of ``CTRGC`` outputs, BN, residual, ReLU.

    Per subset ``s`` and output channel ``c``: ``A_sc = alpha * conv4_s(tanh(x1_s[u] - x2_s[v])) + PA_s``
    (``x1``, ``x2``: relation features of the time-averaged input) and ``z_c = sum_s x3_sc @ A_sc^T``.
    All subsets run batched: one 1x1 convolution for the relation features, one for ``x3``, one
    matmul building every ``A^T`` (``alpha`` scales the small weights, not the large output), one
    matmul aggregating, one sum over subsets.
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: torch.Tensor, rel_reduction: int):
        super().__init__()
        subsets, v, _ = adjacency.shape
        self.subsets, self.out_channels = subsets, out_channels
        self.rel = 8 if in_channels in (3, 9) else in_channels // rel_reduction
        self.conv12 = nn.Conv2d(in_channels, 2 * subsets * self.rel, 1)  # [x1 of s=0..S-1, x2 of s=0..]
        self.conv3 = nn.Conv2d(in_channels, subsets * out_channels, 1)  # channels (s, c)
        # conv4 of every subset as one batched matmul: weight (S, C, R), bias (S, C, 1)
        self.conv4_weight = nn.Parameter(
            torch.randn(subsets, out_channels, self.rel) * math.sqrt(2.0 / out_channels)
        )
        self.conv4_bias = nn.Parameter(torch.zeros(subsets, out_channels, 1))
        # The shared topology, transposed and flattened: pa_t[s, 0, v * V + u] = PA[s, u, v]
        self.pa_t = nn.Parameter(adjacency.transpose(1, 2).reshape(subsets, 1, v * v).clone())
        self.alpha = nn.Parameter(torch.zeros(1))
        if in_channels != out_channels:
            self.down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), _bn(out_channels))
        else:
            self.down = nn.Identity()
        self.bn = _bn(out_channels, 1e-6)
        for m in (self.conv12, self.conv3):
            _conv_init(m)
        if isinstance(self.down, nn.Sequential):
            _conv_init(self.down[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, t, v = x.shape  # N*M, C, T, V
        s, r, c = self.subsets, self.rel, self.out_channels
        q = self.conv12(x.mean(2, keepdim=True))  # N*M, 2*S*R, 1, V
        x1, x2 = q[:, : s * r], q[:, s * r :]  # N*M, S*R, 1, V (index u), ditto (index v)
        rel = torch.tanh(x1 - x2.transpose(2, 3))  # N*M, S*R, V(v), V(u): tanh(x1[u] - x2[v])
        a = torch.matmul(self.conv4_weight * self.alpha, rel.reshape(n, s, r, v * v))  # N*M, S, C, V*V
        a = a + (self.conv4_bias * self.alpha + self.pa_t)  # + alpha * bias + PA^T (S, C, V*V), one pass
        x3 = self.conv3(x)  # N*M, S*C, T, V
        y = torch.matmul(x3.reshape(n * s, c, t, v), a.reshape(n * s, c, v, v))  # N*M*S, C, T, V
        y = y.reshape(n, s, c * t * v).sum(1).reshape(n, c, t, v)  # N*M, C, T, V
        return F.relu(self.bn(y) + self.down(x))


def _max_pool_time3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``max_pool2d(x, (3, 1), (stride, 1), (1, 0))`` as two elementwise maxima of shifted views.

    Same values; 2-3x faster on CPU than the pooling kernel, which also computes argmax indices.
    Gradients differ only where two inputs of a window tie at a positive value.
    """
    pad = F.pad(x, (0, 0, 1, 1), value=float("-inf"))  # N*M, C, T+2, V
    out = torch.maximum(torch.maximum(pad[:, :, :-2], pad[:, :, 1:-1]), pad[:, :, 2:])  # N*M, C, T, V
    return out[:, :, ::stride] if stride > 1 else out


class TemporalConv(nn.Module):
    """CTR-GCN's ``MultiScale_TemporalConv`` without residual: dilated branches, max-pool, 1x1.

    The branches' leading 1x1 convolutions (and their BNs) run as one; the 1x1 branch's stride is
    applied by subsampling afterwards, which equals a strided 1x1 convolution.
    """

    def __init__(self, channels: int, kernel: int, stride: int, dilations: tuple[int, ...]):
        super().__init__()
        self.branch = channels // (len(dilations) + 2)
        self.stride, self.relu_channels = stride, self.branch * (len(dilations) + 1)
        self.reduce = nn.Conv2d(channels, self.branch * (len(dilations) + 2), 1)
        self.reduce_bn = nn.BatchNorm2d(self.relu_channels)
        self.point_bn = nn.BatchNorm2d(self.branch)  # after the stride: its batch statistics as published
        self.dilated = nn.ModuleList()
        for d in dilations:
            pad = (kernel + (kernel - 1) * (d - 1) - 1) // 2
            conv = nn.Conv2d(self.branch, self.branch, (kernel, 1), (stride, 1), (pad, 0), (d, 1))
            self.dilated.append(nn.Sequential(conv, nn.BatchNorm2d(self.branch)))
        self.pool_bn = nn.BatchNorm2d(self.branch)
        for m in self.modules():  # MS-TCN's weights_init
            if isinstance(m, nn.Conv2d):
                _conv_init(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.branch
        h = self.reduce(x)  # N*M, (D+2)*B, T, V
        act = F.relu(self.reduce_bn(h[:, : self.relu_channels]))  # N*M, (D+1)*B, T, V
        outs = [branch(act[:, i * b : (i + 1) * b]) for i, branch in enumerate(self.dilated)]
        pool = _max_pool_time3(act[:, len(self.dilated) * b :], self.stride)
        outs.append(self.pool_bn(pool))
        outs.append(self.point_bn(h[:, self.relu_channels :, :: self.stride]))  # N*M, B, T/stride, V
        return torch.cat(outs, dim=1)  # N*M, C, T/stride, V


class Unit(nn.Module):
    """CTR-GCN's ``TCN_GCN_unit``: graph conv, temporal conv, residual, ReLU."""

    def __init__(
        self, cin: int, cout: int, adjacency: torch.Tensor, stride: int, cfg: CTRGCNConfig, first: bool
    ):
        super().__init__()
        self.gcn = GraphConv(cin, cout, adjacency, cfg.rel_reduction)
        self.tcn = TemporalConv(cout, cfg.temporal_kernel, stride, cfg.dilations)
        self.first = first  # the first unit has no residual
        if first or (cin == cout and stride == 1):
            self.residual = nn.Identity()
        else:
            conv = nn.Conv2d(cin, cout, 1, (stride, 1))
            _conv_init(conv)
            self.residual = nn.Sequential(conv, _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn(self.gcn(x))
        return F.relu(y if self.first else y + self.residual(x))


def fold_input(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, V, M)`` -> ``(N, C, T, V*M)``: the only step that touches a rank-5 tensor."""
    return features.fold(x)


class CTRGCN(nn.Module):
    """One CTR-GCN stream: ``(N, C, T, V, M)`` -> class scores ``(N, num_classes)``.

    ``forward_folded`` takes the input already folded by :func:`fold_input` (the multi-stream model
    derives its streams there); ``features`` returns the pooled features before the classifier.
    """

    def __init__(self, cfg: CTRGCNConfig):
        super().__init__()
        self.cfg = cfg
        adjacency = torch.from_numpy(adjacency_subsets())
        m, v, c = cfg.num_persons, NUM_JOINTS, cfg.in_channels
        self.data_bn = nn.BatchNorm1d(m * v * c)
        nn.init.ones_(self.data_bn.weight)
        nn.init.zeros_(self.data_bn.bias)
        units, cin = [], c
        for i, (cout, stride) in enumerate(zip(cfg.channels, cfg.strides, strict=True)):
            units.append(Unit(cin, cout, adjacency, stride, cfg, first=i == 0))
            cin = cout
        self.units = nn.Sequential(*units)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin, cfg.num_classes)
        nn.init.normal_(self.fc.weight, 0, math.sqrt(2.0 / cfg.num_classes))
        nn.init.zeros_(self.fc.bias)

    @property
    def feature_dim(self) -> int:
        return self.cfg.channels[-1]

    def person_features_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Folded input ``(N, C, T, V*M')`` -> each person's pooled features ``(N, M', channels[-1])``.

        ``M'`` is ``num_persons`` or fewer: then the input holds the first ``M'`` person slots only and
        ``data_bn`` normalises them with those slots' statistics, which is exact in eval mode only
        (in training BN's batch statistics would cover the missing slots too).
        """
        n, c, t, vm = x.shape
        v = NUM_JOINTS
        m = vm // v
        x = x.reshape(n, c * t, v, m).permute(0, 3, 2, 1)  # N, M, V, C*T
        x = x.reshape(n, m * v * c, t)
        if m == self.cfg.num_persons:
            x = self.data_bn(x)  # N, M*V*C, T
        else:
            if self.training or m > self.cfg.num_persons:
                raise ValueError(f"{m} person slots need eval mode and at most {self.cfg.num_persons}")
            k, bn = m * v * c, self.data_bn
            x = F.batch_norm(
                x, bn.running_mean[:k], bn.running_var[:k], bn.weight[:k], bn.bias[:k], False, 0.0, bn.eps
            )
        x = x.reshape(n * m, v, c, t).permute(0, 2, 3, 1)  # N*M, C, T, V
        x = self.units(x)  # N*M, C', T', V
        c_out = x.shape[1]
        return x.reshape(n, m, c_out, -1).mean(3)  # N, M, C'

    def features_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Folded input ``(N, C, T, V*M)`` -> pooled features ``(N, channels[-1])`` (mean over persons)."""
        return self.person_features_folded(x).mean(1)  # N, C'

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features_folded(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, V, M)`` -> pooled features ``(N, channels[-1])``."""
        return self.features_folded(fold_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, V, M)`` -> class scores ``(N, num_classes)``."""
        return self.forward_folded(fold_input(x))


def convert_reference_state_dict(state: dict, cfg: CTRGCNConfig) -> dict:
    """Map a state dict of the published CTR-GCN code (``model.ctrgcn.Model``) onto :class:`CTRGCN`.

    Lets a user load the published weights (files they supply; nothing is downloaded). Keys with a
    ``module.`` prefix (DataParallel) are accepted.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {}
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        out[f"data_bn.{key}"] = state[f"data_bn.{key}"]
    out["fc.weight"], out["fc.bias"] = state["fc.weight"], state["fc.bias"]
    subsets = adjacency_subsets().shape[0]
    for i in range(len(cfg.channels)):
        src, dst = f"l{i + 1}.", f"units.{i}."
        g, sg = dst + "gcn.", src + "gcn1."
        convs = [f"{sg}convs.{s}." for s in range(subsets)]
        for p in ("weight", "bias"):
            out[g + f"conv12.{p}"] = torch.cat(
                [state[c + f"conv1.{p}"] for c in convs] + [state[c + f"conv2.{p}"] for c in convs]
            )
            out[g + f"conv3.{p}"] = torch.cat([state[c + f"conv3.{p}"] for c in convs])  # order (s, c)
        out[g + "conv4_weight"] = torch.stack([state[c + "conv4.weight"][:, :, 0, 0] for c in convs])
        out[g + "conv4_bias"] = torch.stack([state[c + "conv4.bias"][:, None] for c in convs])
        pa = state[sg + "PA"]  # S, V, V
        out[g + "pa_t"] = pa.transpose(1, 2).reshape(pa.shape[0], 1, -1)
        out[g + "alpha"] = state[sg + "alpha"]
        for key in _bn_keys():
            out[g + f"bn.{key}"] = state[sg + f"bn.{key}"]
        if any(k.startswith(sg + "down.") for k in state):
            for k in [k for k in state if k.startswith(sg + "down.")]:
                out[g + k[len(sg) :]] = state[k]
        t, st = dst + "tcn.", src + "tcn1."
        branches = len(cfg.dilations) + 2
        for p in ("weight", "bias"):
            out[t + f"reduce.{p}"] = torch.cat([state[f"{st}branches.{b}.0.{p}"] for b in range(branches)])
        for key in _bn_keys(with_count=False):
            out[t + f"reduce_bn.{key}"] = torch.cat(
                [state[f"{st}branches.{b}.1.{key}"] for b in range(branches - 1)]
            )
        out[t + "reduce_bn.num_batches_tracked"] = state[f"{st}branches.0.1.num_batches_tracked"]
        for key in _bn_keys():
            out[t + f"point_bn.{key}"] = state[f"{st}branches.{branches - 1}.1.{key}"]
        for b in range(len(cfg.dilations)):
            for p in ("weight", "bias"):
                out[t + f"dilated.{b}.0.{p}"] = state[f"{st}branches.{b}.3.conv.{p}"]
            for key in _bn_keys():
                out[t + f"dilated.{b}.1.{key}"] = state[f"{st}branches.{b}.3.bn.{key}"]
        for key in _bn_keys():
            out[t + f"pool_bn.{key}"] = state[f"{st}branches.{len(cfg.dilations)}.4.{key}"]
        for k in [k for k in state if k.startswith(src + "residual.")]:
            name = k[len(src + "residual.") :].replace("conv.", "0.").replace("bn.", "1.")
            out[dst + "residual." + name] = state[k]
    return out


def _bn_keys(with_count: bool = True) -> list[str]:
    keys = ["weight", "bias", "running_mean", "running_var"]
    return [*keys, "num_batches_tracked"] if with_count else keys


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CTRGCN",
    "MODEL_SIZES",
    "CTRGCNConfig",
    "config_for",
    "convert_reference_state_dict",
    "count_parameters",
    "fold_input",
]
