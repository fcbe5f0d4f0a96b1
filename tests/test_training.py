"""Training building blocks: schedules, EMA, accuracy, checkpoints and RNG state."""

from __future__ import annotations

import functools
import itertools
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import training
from stages.training import EMA, Recipe


def recipe(**kw) -> Recipe:
    base = dict(optimizer="sgd", lr=0.1, weight_decay=4e-4, batch_size=64, epochs=65, warmup_epochs=5)
    return Recipe(**{**base, **kw})


def test_step_schedule_with_warmup_matches_ctrgcn():
    r = recipe(schedule="step", lr_steps=(35, 55), lr_decay=0.1)
    spe = 10
    assert training.lr_at(r, 0, spe) == pytest.approx(0.1 / 50)
    assert training.lr_at(r, 49, spe) == pytest.approx(0.1)  # end of warm-up
    assert training.lr_at(r, 34 * spe, spe) == pytest.approx(0.1)
    assert training.lr_at(r, 35 * spe, spe) == pytest.approx(0.01)
    assert training.lr_at(r, 64 * spe, spe) == pytest.approx(0.001)


def test_cosine_schedule_ends_at_its_floor():
    r = recipe(optimizer="adamw", lr=0.003, schedule="cosine", warmup_epochs=1, epochs=6, min_lr=1e-5)
    spe = 20
    lrs = [training.lr_at(r, s, spe) for s in range(6 * spe)]
    assert max(lrs) == pytest.approx(0.003, rel=1e-3)
    assert lrs[-1] == pytest.approx(1e-5, abs=2e-6)
    after = lrs[spe:]
    assert all(a >= b for a, b in itertools.pairwise(after))  # monotone after warm-up


def test_topk_accuracy_on_known_predictions():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = np.array([1, 1, 2, 2])
    assert training.topk_accuracy(scores, labels, 1) == 0.5
    assert training.topk_accuracy(scores, labels, 2) == 0.75
    assert training.topk_accuracy(scores, labels, 5) == 1.0


def test_ema_warms_up_and_copies_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(model)  # first decay = min(0.99, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    state = {k: v for k, v in ema.state_dict().items()}
    restored = EMA(model, decay=0.99)
    restored.load_state_dict(state)
    assert int(restored.updates) == 1


def test_checkpoints_are_atomic_and_load_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    payload = {
        "model": {"w": torch.ones(2)},
        "epoch": 3,
        "history": [{"a": 1.0, "b": None}],
        "rng": training.rng_state(),
    }
    training.save_checkpoint(path, payload)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = training.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    before = path.read_bytes()

    def dies_half_way(obj, f):  # a run killed while it writes: half a file, then the end
        Path(f).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            training.save_checkpoint(path, {**payload, "epoch": 4})
    assert path.read_bytes() == before  # the last complete checkpoint is still there, whole
    # weights only: a checkpoint that would run code when unpickled is refused, not loaded
    torch.save({"model": {}, "hook": functools.partial(print, "ran")}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        training.load_checkpoint(path)


def test_rng_state_round_trips():
    state = training.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    training.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_recipe_values_are_checked():
    from stages.params import ParamsError

    with pytest.raises(ParamsError, match="ema_decay"):
        Recipe(optimizer="adamw", lr=0.1, weight_decay=0, batch_size=4, epochs=1, ema_decay=1.0).validate()


def test_average_clips_averages_probabilities_per_sample():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [3.0, 0.0]])  # 2 samples x 2 clips
    out = training.average_clips(logits, 2)
    p = torch.softmax(logits, 1)
    assert torch.allclose(out.exp(), torch.stack([(p[0] + p[1]) / 2, (p[2] + p[3]) / 2]))
    stacked = training.average_clips(torch.stack([logits, logits]), 2)  # leading stream dim kept
    assert stacked.shape == (2, 2, 2) and torch.allclose(stacked[1], out)
