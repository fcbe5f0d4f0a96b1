"""The model rebuilt for inference (what the export stage exports) computes the trained model's function."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.ctrgcn import CTRGCNConfig, config_for
from models.inference import InferenceMultiStream, bn_affine
from models.two_stream import MultiStream, SoloStreams
from stages import export


def _trained_like(model: MultiStream, seed: int) -> MultiStream:
    """Every batch norm with its own statistics and affine, every topology term non-zero: a freshly
    initialised model has identity BNs, alpha 0 and zero conv4 biases, under which a wrong fold
    would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "conv4_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _assert_same_scores(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding of the scores' scale: these random models' scores reach 1e4, so a
    class scoring 88 carries the rounding of its row's sums (differences of 4e-3 = 3e-7 of the scale
    on an AMD EPYC, where an element-wise 2e-5 failed); a wrong fold changes scores by far more."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, atol=2e-6 * max(1.0, scale), rtol=2e-5)


@pytest.mark.parametrize(
    ("streams", "fusion"),
    [
        (("joint", "bone"), "sum"),
        (("joint", "bone", "joint_motion", "bone_motion"), "concat"),
        (("bone",), "attention"),
    ],
)
def test_inference_model_computes_the_models_scores(streams, fusion):
    torch.manual_seed(0)
    model = _trained_like(
        MultiStream({s: config_for("small", 7) for s in streams}, fusion=fusion, weights={"joint": 0.6}), 1
    )
    fast = InferenceMultiStream(model)
    for n, t in ((1, 64), (3, 40), (2, 9)):
        x = torch.randn(n, 3, t, 25, 2) * 0.4
        x[0, ..., 1] = 0  # one sample with an absent second person
        with torch.no_grad():
            _assert_same_scores(fast(x), model(x))


def test_one_person_inference_model_gives_the_full_models_scores():
    torch.manual_seed(1)
    model = _trained_like(MultiStream({s: config_for("small", 5) for s in ("joint", "bone")}), 2)
    fast = InferenceMultiStream(model, solo_frames=48)
    x = torch.randn(4, 3, 48, 25, 2) * 0.4
    x[..., 1] = 0
    with torch.no_grad():
        _assert_same_scores(fast(x[..., :1]), model(x))
        _assert_same_scores(fast(x[..., :1]), SoloStreams(model, 48)(x[..., :1]))


def test_batch_norm_folding_arithmetic():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, 0.5, -2.0]))
    scale, shift = bn_affine(bn)
    x = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))
    var = torch.tensor([4.0, 0.25, 1.0, 9.0])
    torch.testing.assert_close(scale, torch.tensor([0.5, 4.0, -1.0, 1.0]) / torch.sqrt(1 + bn.eps / var))


def test_inference_model_leaves_the_trained_model_untouched():
    model = _trained_like(MultiStream({s: config_for("small", 3) for s in ("joint", "bone")}), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = InferenceMultiStream(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fast.parameters())
    assert list(fast.parameters()) == []  # sum fusion: every weight is a folded constant (a buffer)


def test_exported_inference_graph_has_no_batch_norm_and_matches(tmp_path):
    torch.manual_seed(4)
    two_units = CTRGCNConfig(num_classes=5, channels=(16, 32), strides=(1, 2))
    model = _trained_like(MultiStream({s: two_units for s in ("joint", "bone")}), 5)
    export.export_onnx(InferenceMultiStream(model), tmp_path / "m.onnx")
    report = export.graph_report(tmp_path / "m.onnx")
    assert report["max_intermediate_rank"] <= 4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "MaxPool" in ops  # folded; ONNX's pooling
    x = np.random.default_rng(2).normal(0, 0.4, size=(2, 3, 50, 25, 2)).astype(np.float32)
    np.testing.assert_allclose(
        export.ort_scores(export.ort_session(tmp_path / "m.onnx"), x),
        export.torch_scores(model, x),
        atol=1e-4,
        rtol=1e-4,
    )
