"""CTR-GCN: the published network computed with fewer ops, export-friendly, and its configs."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from benchmarks.reference_ctrgcn_model import Model as ReferenceModel
from models.ctrgcn import CTRGCN, CTRGCNConfig, config_for, convert_reference_state_dict, count_parameters
from models.skeleton import adjacency_subsets
from models.two_stream import MultiStream


def reference_for(cfg: CTRGCNConfig) -> ReferenceModel:
    return ReferenceModel(
        adjacency_subsets(), num_class=cfg.num_classes, channels=cfg.channels, strides=cfg.strides
    )


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial alpha, BatchNorm affine parameters and running statistics (from a few batches),
    so that the comparison exercises every term with activations of a realistic scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.7)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
                m.momentum = None  # cumulative average over the batches below
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, 40, 25, 2, generator=g))


def test_full_config_is_the_published_size():
    model = CTRGCN(config_for("full", 120))
    assert count_parameters(model) == count_parameters(reference_for(model.cfg)) == 1_462_092
    assert abs(count_parameters(model) - 1.46e6) / 1.46e6 < 0.05
    assert model(torch.zeros(2, 3, 64, 25, 2)).shape == (2, 120)


def test_small_config_shapes_and_size():
    model = CTRGCN(config_for("small", 16))
    assert count_parameters(model) < 100_000
    assert model(torch.randn(3, 3, 48, 25, 2)).shape == (3, 16)
    assert model.features(torch.randn(3, 3, 48, 25, 2)).shape == (3, 64)


@pytest.mark.parametrize("size", ["small", "full"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_function_as_the_published_code(size, mode):
    cfg = config_for(size, 10)
    torch.manual_seed(0)
    reference, ours = reference_for(cfg), CTRGCN(cfg)
    randomise(reference)
    ours.load_state_dict(convert_reference_state_dict(reference.state_dict(), cfg))
    getattr(reference, mode)()
    getattr(ours, mode)()
    x = torch.randn(3, 3, 40, 25, 2)
    expected = reference(x)
    assert torch.allclose(ours(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_conversion_accepts_data_parallel_keys():
    cfg = config_for("small", 5)
    reference = reference_for(cfg)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    CTRGCN(cfg).load_state_dict(convert_reference_state_dict(state, cfg))  # strict: every key mapped


class OpRecorder(TorchFunctionMode):
    """Every torch function called and the largest rank of the tensors it returned."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        rank = max((t.dim() for t in outs if isinstance(t, torch.Tensor)), default=0)
        self.calls.append((getattr(func, "__name__", str(func)), rank))
        return out


def record(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, int]]:
    with torch.no_grad(), OpRecorder() as rec:
        model(x)
    return rec.calls


def test_no_einsum_and_nothing_above_rank_4_after_the_fold():
    cfg = config_for("small", 7)
    model = MultiStream({s: cfg for s in ("joint", "bone", "joint_motion", "bone_motion")}).eval()
    calls = record(model, torch.randn(2, 3, 32, 25, 2))
    assert calls and not [c for c in calls if "einsum" in c[0]]
    assert max(rank for _, rank in calls) <= 4
    # the check can fail: the published code uses einsum and rank-5 tensors
    ref_calls = record(reference_for(cfg).eval(), torch.randn(2, 3, 32, 25, 2))
    assert any("einsum" in name for name, _ in ref_calls) and max(r for _, r in ref_calls) == 5


def test_config_round_trips_and_rejects_bad_sizes():
    cfg = config_for("small", 12, dropout=0.1)
    assert CTRGCNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="valid: full, small"):
        config_for("medium", 12)
    with pytest.raises(ValueError, match="branches"):
        CTRGCNConfig(channels=(30,), strides=(1,))
