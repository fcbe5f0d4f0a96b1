"""A trained multi-stream CTR-GCN rebuilt for inference: the same function in fewer, cheaper operators.

The export stage exports this module instead of :class:`models.two_stream.MultiStream` (and checks
the two against each other on the test split). In eval mode every batch norm is an affine map per
channel, and most of them can be folded into the convolution before them; some of the training
graph's layout choices also cost more in ONNX Runtime than the work they do. What changes, per
graph convolution and temporal convolution of each stream:

- the graph convolution's batch norm is folded into ``conv3`` (the aggregation is linear in
  ``conv3``'s output, channel by channel) and its shift into the residual branch's bias;
- the sum over the 3 adjacency subsets is two additions of contiguous slices (ONNX Runtime's
  ``ReduceSum`` over that middle axis took 90 us a layer on a 2-core CPU, more than the slices and
  additions together);
- the temporal branches' leading batch norms (``reduce_bn`` on the activated channels, ``point_bn``
  on the 1x1 branch after its stride) are folded into the shared 1x1 convolution, and the dilated
  branches' and residual's batch norms into their convolutions;
- ``data_bn`` is one affine map on the folded input, and persons are unfolded with one transpose;
- the per-channel topologies come from one matmul, their constant part (``alpha * conv4 bias + PA``)
  included as two extra rows and columns (adding it afterwards was a pass over the largest
  tensor of the unit);
- the max-pool branch is ONNX ``MaxPool`` (the training graph's two elementwise maxima are faster
  in PyTorch on CPU, whose pooling kernel also computes indices; ONNX Runtime's is not).

Measured on the default model's one-person graph (2-core CPU, ONNX Runtime, 1 thread, batch 1,
A/B runs): 5.36 ms exported from the training modules against 4.45 ms with the folds and additions;
``MaxPool`` and the topology rows took another 5% each (4.17 ms in the last run).

Nothing here is trainable: the weights are buffers computed from a model in eval mode, so the module
is only valid for inference with that model's running statistics. Tests compare it to the model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models import features
from models.ctrgcn import CTRGCN, GraphConv, TemporalConv, Unit
from models.skeleton import NUM_JOINTS
from models.two_stream import MultiStream, SoloStreams, stream_input


def bn_affine(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of ``bn`` in eval mode: ``bn(x) = x * scale + shift``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by the affine map ``x * scale + shift`` per output channel."""
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return conv.weight * scale.view(-1, 1, 1, 1), bias * scale + shift


class _Folded(nn.Module):
    """Holds constant tensors as buffers (they follow ``.to()`` and become graph initialisers)."""

    def _const(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value.detach().clone().contiguous())


class InferenceGraphConv(_Folded):
    """:class:`models.ctrgcn.GraphConv` with its batch norm folded (see the module docstring)."""

    def __init__(self, g: GraphConv):
        super().__init__()
        s, c = g.subsets, g.out_channels
        self.subsets, self.rel, self.out_channels = s, g.rel, c
        scale, shift = bn_affine(g.bn)
        self._const("w12", g.conv12.weight)
        self._const("b12", g.conv12.bias)
        scale3 = scale.repeat(s)  # conv3's channels are (s, c)
        self._const("w3", g.conv3.weight * scale3.view(-1, 1, 1, 1))
        self._const("b3", g.conv3.bias * scale3)
        # A = alpha * (conv4_w @ rel + conv4_b) + PA as one matmul: two more "relation" rows, ones and
        # PA, against two more weight columns, alpha * conv4_b and ones (an add of the (S, C, V*V)
        # constant afterwards cost more than the matmul)
        w4 = g.conv4_weight * g.alpha  # S, C, R
        self._const("w4", torch.cat([w4, g.conv4_bias * g.alpha, torch.ones(s, c, 1)], dim=2))  # S, C, R+2
        vv = g.pa_t.shape[-1]
        self._const("rel_rows", torch.cat([torch.ones(s, 1, vv), g.pa_t], dim=1)[None])  # 1, S, 2, V*V
        self.down = isinstance(g.down, nn.Sequential)
        if self.down:
            wd, bd = fold_conv(g.down[0], *bn_affine(g.down[1]))
            self._const("wd", wd)
            self._const("bd", bd + shift)
        else:
            self._const("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, t, v = x.shape
        s, r, c = self.subsets, self.rel, self.out_channels
        q = F.conv2d(x.mean(2, keepdim=True), self.w12, self.b12)  # N, 2*S*R, 1, V
        rel = torch.tanh(q[:, : s * r] - q[:, s * r :].transpose(2, 3))  # N, S*R, V(v), V(u)
        rel = torch.cat([rel.reshape(n, s, r, v * v), self.rel_rows.expand(n, -1, -1, -1)], dim=2)
        a = torch.matmul(self.w4, rel)  # N, S, C, V*V: A^T of every subset and channel
        x3 = F.conv2d(x, self.w3, self.b3)  # N, S*C, T, V (BN scale folded in)
        y = torch.matmul(x3.reshape(n * s, c, t, v), a.reshape(n * s, c, v, v)).reshape(n, s * c, t, v)
        z = y[:, :c]
        for i in range(1, s):
            z = z + y[:, i * c : (i + 1) * c]
        residual = F.conv2d(x, self.wd, self.bd) if self.down else x + self.shift
        return F.relu(z + residual)


class InferenceTemporalConv(_Folded):
    """:class:`models.ctrgcn.TemporalConv` with every batch norm but the max-pool branch's folded."""

    def __init__(self, tc: TemporalConv):
        super().__init__()
        self.branch, self.stride, self.relu_channels = tc.branch, tc.stride, tc.relu_channels
        s_relu, t_relu = bn_affine(tc.reduce_bn)
        s_point, t_point = bn_affine(tc.point_bn)  # per channel, so it commutes with the stride
        w, b = fold_conv(tc.reduce, torch.cat([s_relu, s_point]), torch.cat([t_relu, t_point]))
        self._const("w_reduce", w)
        self._const("b_reduce", b)
        self.dilated = []
        for i, branch in enumerate(tc.dilated):
            conv = branch[0]
            wd, bd = fold_conv(conv, *bn_affine(branch[1]))
            self._const(f"w_dilated{i}", wd)
            self._const(f"b_dilated{i}", bd)
            self.dilated.append((conv.padding, conv.dilation))
        s_pool, t_pool = bn_affine(tc.pool_bn)
        self._const("pool_scale", s_pool.view(1, -1, 1, 1))
        self._const("pool_shift", t_pool.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, stride = self.branch, self.stride
        h = F.conv2d(x, self.w_reduce, self.b_reduce)  # N*M, (D+2)*B, T, V (both BNs folded)
        act = F.relu(h[:, : self.relu_channels])
        outs = [
            F.conv2d(
                act[:, i * b : (i + 1) * b],
                getattr(self, f"w_dilated{i}"),
                getattr(self, f"b_dilated{i}"),
                (stride, 1),
                padding,
                dilation,
            )
            for i, (padding, dilation) in enumerate(self.dilated)
        ]
        pool = F.max_pool2d(act[:, len(self.dilated) * b :], (3, 1), (stride, 1), (1, 0))
        outs.append(pool * self.pool_scale + self.pool_shift)
        outs.append(h[:, self.relu_channels :, ::stride])
        return torch.cat(outs, dim=1)


class InferenceUnit(_Folded):
    def __init__(self, unit: Unit):
        super().__init__()
        self.gcn = InferenceGraphConv(unit.gcn)
        self.tcn = InferenceTemporalConv(unit.tcn)
        self.first = unit.first
        self.conv_residual = isinstance(unit.residual, nn.Sequential)
        if self.conv_residual:
            conv = unit.residual[0]
            w, b = fold_conv(conv, *bn_affine(unit.residual[1]))
            self._const("w_res", w)
            self._const("b_res", b)
            self.res_stride = conv.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn(self.gcn(x))
        if self.first:
            return F.relu(y)
        residual = F.conv2d(x, self.w_res, self.b_res, self.res_stride) if self.conv_residual else x
        return F.relu(y + residual)


class InferenceStream(_Folded):
    """One :class:`models.ctrgcn.CTRGCN` stream: folded input ``(N, C, T, V*M')`` -> each person's
    pooled features ``(N, M', F)`` (``M'`` <= the model's persons: the first ``M'`` slots, as
    :meth:`CTRGCN.person_features_folded` in eval mode), and its classifier."""

    def __init__(self, stream: CTRGCN):
        super().__init__()
        self.persons, self.channels = stream.cfg.num_persons, stream.cfg.in_channels
        scale, shift = bn_affine(stream.data_bn)  # channel index m * V * C + v * C + c
        shape = (self.persons, NUM_JOINTS, self.channels)
        # -> (C, V, M): the folded layout's channel c, joint-person index v * M + m
        self._const("in_scale", scale.view(shape).permute(2, 1, 0))
        self._const("in_shift", shift.view(shape).permute(2, 1, 0))
        self.units = nn.Sequential(*(InferenceUnit(u) for u in stream.units))
        self._const("fc_weight", stream.fc.weight)
        self._const("fc_bias", stream.fc.bias)

    def person_features_folded(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, vm = x.shape
        v = NUM_JOINTS
        m = vm // v
        if m > self.persons:
            raise ValueError(f"{m} person slots; the model has {self.persons}")
        scale = self.in_scale[:, :, :m].reshape(1, c, 1, vm)
        shift = self.in_shift[:, :, :m].reshape(1, c, 1, vm)
        x = x * scale + shift  # N, C, T, V*M (data_bn)
        if m > 1:
            x = x.reshape(n, c * t, v, m).permute(0, 3, 1, 2)  # N, M, C*T, V
        x = self.units(x.reshape(n * m, c, t, v))  # N*M, C', T', V
        return x.reshape(n, m, x.shape[1], -1).mean(3)  # N, M, C'

    def fc(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(feats, self.fc_weight, self.fc_bias)


class InferenceMultiStream(nn.Module):
    """:class:`models.two_stream.MultiStream` (eval mode) for inference: joints ``(N, 3, T, 25, M)``
    -> fused scores ``(N, K)``.

    With ``solo_frames`` it is the one-person graph instead (:class:`models.two_stream.SoloStreams`):
    joints ``(N, 3, solo_frames, 25, 1)``, the absent persons' constant features added back.
    """

    def __init__(self, model: MultiStream, solo_frames: int | None = None):
        super().__init__()
        model = model.eval()
        self.names, self.fusion = model.names, model.fusion
        with torch.no_grad():
            self.streams = nn.ModuleList(InferenceStream(model.streams[n]) for n in model.names)
            self.head = copy.deepcopy(model.head)  # the learned fusion's, if any
            self.register_buffer("weights", model.weights.clone())
            self.persons = self.streams[0].persons
            self.solo = solo_frames is not None
            if self.solo:
                self.register_buffer("absent", SoloStreams(model, solo_frames).absent.clone())
        self.requires_grad_(False)
        self.eval()

    fuse = MultiStream.fuse  # reads fusion, head and weights, as the model's does

    def forward(self, joints: torch.Tensor) -> torch.Tensor:
        folded = features.fold(joints)  # N, C, T, V*M
        m = joints.shape[-1]
        feats, start = [], 0
        for name, stream in zip(self.names, self.streams, strict=True):
            person = stream.person_features_folded(stream_input(folded, name, m))  # N, M, F
            if self.solo:
                width = person.shape[2]
                f = (person[:, 0] + self.absent[start : start + width]) / self.persons
                start += width
            else:
                f = person.mean(1)
            feats.append(f)
        scores = torch.stack([s.fc(f) for s, f in zip(self.streams, feats, strict=True)])
        return self.fuse(scores, torch.cat(feats, dim=1))


__all__ = ["InferenceMultiStream", "bn_affine", "fold_conv"]
