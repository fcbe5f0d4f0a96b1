"""The multi-stream model: streams derived inside it with the shared math, and its fusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import features
from models.ctrgcn import CTRGCN, config_for
from models.two_stream import MultiStream, SoloStreams, fit_fusion_head


def test_folded_streams_equal_the_shared_feature_math():
    x = torch.randn(2, 3, 10, 25, 2)
    assert torch.equal(features.bones_folded(features.fold(x), 2), features.fold(features.bones(x)))
    assert torch.equal(features.motion_folded(features.fold(x)), features.fold(features.motion(x)))
    assert np.array_equal(features.bones(x.numpy()), features.bones(x).numpy())


def test_sum_fusion_is_the_weighted_sum_of_stream_scores():
    torch.manual_seed(0)
    cfg = config_for("small", 6)
    model = MultiStream(
        {"joint": cfg, "bone": cfg, "bone_motion": cfg}, weights={"joint": 0.6, "bone": 0.3}
    ).eval()
    joint, bone, bone_motion = (CTRGCN(cfg).eval() for _ in range(3))
    for name, net in (("joint", joint), ("bone", bone), ("bone_motion", bone_motion)):
        net.load_state_dict(model.streams[name].state_dict())
    x = torch.randn(4, 3, 32, 25, 2)
    with torch.no_grad():
        expected = (
            0.6 * joint(x)
            + 0.3 * bone(features.bones(x))
            + 1.0 * bone_motion(features.motion(features.bones(x)))
        )
        fused = model(x)
        per_stream, feats = model.per_stream(x)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert per_stream.shape == (3, 4, 6) and feats.shape == (4, 3 * 64)
    assert torch.allclose(per_stream[1], bone(features.bones(x)), atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_learned_fusions_fit_on_frozen_stream_outputs(fusion):
    torch.manual_seed(1)
    model = MultiStream({"joint": config_for("small", 3), "bone": config_for("small", 3)}, fusion=fusion)
    labels = torch.arange(30) % 3
    feats = torch.randn(30, 128) + 2.0 * torch.nn.functional.one_hot(labels, 128).float()
    scores = torch.randn(2, 30, 3)
    scores[0] += 3.0 * torch.nn.functional.one_hot(labels, 3).float()  # the joint stream is the good one
    with torch.inference_mode():  # as evaluate's stream pass makes them (a crash before the clone)
        scores, feats = scores.clone(), feats.clone()
    losses = fit_fusion_head(model, scores, feats, labels, epochs=150)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        fused, gate = model.fuse(scores, feats), torch.softmax(model.head(feats), 1)
    assert fused.shape == (30, 3) and (fused.argmax(1) == labels).float().mean() > 0.9
    if fusion == "attention":
        assert gate[:, 0].mean() > 0.5  # learned to trust the informative stream


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="valid: sum, concat, attention"):
        MultiStream({"joint": config_for("small", 3)}, fusion="max")
    with pytest.raises(ValueError, match="unknown stream"):
        MultiStream({"velocity": config_for("small", 3)})
    with pytest.raises(ValueError, match="number of classes"):
        MultiStream({"joint": config_for("small", 3), "bone": config_for("small", 4)})


@pytest.mark.parametrize("fusion", ["sum", "concat", "attention"])
def test_one_person_model_gives_the_full_models_scores(fusion):
    torch.manual_seed(2)
    streams = ("joint", "bone", "joint_motion")
    model = MultiStream({s: config_for("small", 5) for s in streams}, fusion=fusion, weights={"joint": 0.6})
    with torch.no_grad():  # BN statistics of the second slot unlike the first, so slot 2 is not a copy
        model.train()
        for _ in range(3):
            x = torch.randn(8, 3, 48, 25, 2)
            x[..., 1] = x[..., 1] * 3 + 1
            model(x)
    model.eval()
    x = torch.randn(4, 3, 48, 25, 2)
    x[..., 1] = 0
    solo = SoloStreams(model, 48)
    with torch.no_grad():
        full, alone = model(x), solo(x[..., :1])
        assert torch.allclose(alone, full, atol=1e-5)
        # the absent person's features are what makes it exact: without them the scores move
        solo.absent.zero_()
        assert not torch.allclose(solo(x[..., :1]), full, atol=1e-3)
    with pytest.raises(ValueError, match="eval mode"):
        model.streams["joint"].train().person_features_folded(features.fold(x[..., :1]))
