"""Training building blocks: schedules, EMA, accuracy, checkpoints and RNG state."""

from __future__ import annotations

import functools
import itertools
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import training
from stages.training import EMA, Recipe

ROOT = Path(__file__).resolve().parents[1]


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


def test_epoch_totals_are_reduced_on_the_runtime_device(monkeypatch):
    """NCCL has no CPU tensors: the epoch's totals, kept on the CPU, were all-reduced as they were, and
    every multi-GPU run died at the end of epoch 1 (a training audit). They go to the device first."""
    seen = []

    def nccl_like(tensor, op=None):  # refuses CPU tensors, as a NCCL process group does
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append(tensor.device)

    monkeypatch.setattr(training.dist, "all_reduce", nccl_like)
    totals = torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64)
    gpu_like = training.Runtime(torch.device("meta"), None, False, rank=0, world_size=2)
    assert training.sum_over_ranks(totals, gpu_like).device.type == "meta" and seen == [torch.device("meta")]
    single = training.Runtime(torch.device("cpu"), None, False)
    assert training.sum_over_ranks(totals, single) is totals  # one process: no collective at all


def fake_world_of_two(monkeypatch, others_flag: int) -> None:
    """A 2-process group seen from rank 0: the other rank's non-finite flag is ``others_flag``."""
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(training.dist, "get_world_size", lambda: 2)

    def all_reduce(tensor, op=None):
        assert op == training.dist.ReduceOp.MAX
        tensor.fill_(max(int(tensor), others_flag))

    monkeypatch.setattr(training.dist, "all_reduce", all_reduce)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(monkeypatch):
    """A NaN on one rank raised there while the other ranks entered backward and waited for its
    gradients for ever (DDP hang). The ranks all-reduce the flag and all stop, before backward."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    fake_world_of_two(monkeypatch, others_flag=1)
    loss = model(torch.ones(1, 2)).sum()  # finite here
    with pytest.raises(FloatingPointError, match="non-finite training loss on another rank at step 7"):
        training.optimizer_step(loss, model, optimizer, None, 7)
    assert torch.equal(model.weight, before) and model.weight.grad is None  # no backward, no step
    fake_world_of_two(monkeypatch, others_flag=0)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 8"):
        training.optimizer_step(loss * float("nan"), model, optimizer, None, 8)
    training.optimizer_step(model(torch.ones(1, 2)).sum(), model, optimizer, None, 9)
    assert not torch.equal(model.weight, before)  # every rank finite: the step happens


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_a_resumed_optimizer_keeps_this_runtimes_kernels(cls):
    """``load_state_dict`` restored the saved groups' ``fused`` flag: a GPU checkpoint (fused) resumed
    on a CPU ran fused there, a CPU one resumed on a GPU ran unfused."""
    param = torch.nn.Parameter(torch.ones(3))
    extra = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    fused = cls([param], lr=0.1, fused=True, **extra)
    param.grad = torch.ones(3)
    fused.step()
    plain = cls([param], lr=0.1, **extra)  # what build_optimizer makes on a CPU
    training.load_optimizer_state(plain, fused.state_dict())
    assert not plain.param_groups[0]["fused"] and plain.param_groups[0]["foreach"] is None
    key = "momentum_buffer" if extra else "exp_avg"
    assert torch.equal(plain.state[param][key], fused.state[param][key])  # the state itself is loaded
    again = cls([param], lr=0.1, fused=True, **extra)  # and the other way round
    training.load_optimizer_state(again, plain.state_dict())
    assert again.param_groups[0]["fused"] is True


def test_cuda_rng_states_restore_on_fewer_gpus(monkeypatch):
    """A checkpoint saved with 2 visible GPUs, resumed with 1: ``set_rng_state_all`` indexed past the
    devices (IndexError). Only the states of the visible devices are restored."""
    gpus = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]
    state = {**training.rng_state(), "cuda": gpus}  # as saved where 2 GPUs were visible
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    training.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], gpus[0])


def test_cuda_speedups_use_the_per_backend_tf32_api_when_there_is_one(monkeypatch):
    """torch >= 2.9 deprecates ``allow_tf32`` for ``fp32_precision``; older torch has only the flags."""
    import types

    new_matmul = types.SimpleNamespace(fp32_precision="ieee")
    new_conv = types.SimpleNamespace(fp32_precision="ieee")
    cpu_matmul = types.SimpleNamespace(fp32_precision="none")
    global_calls = []

    def set_global(precision):  # as torch does: the CPU matmuls follow the global setting too
        global_calls.append(precision)
        cpu_matmul.fp32_precision = "tf32"

    monkeypatch.setattr(torch.backends.cuda, "matmul", new_matmul)
    monkeypatch.setattr(torch.backends.cudnn, "conv", new_conv, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", cpu_matmul, raising=False)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_global)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    training.enable_cuda_speedups()
    assert new_matmul.fp32_precision == new_conv.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
    assert global_calls == ["high"] and cpu_matmul.fp32_precision == "none"  # the CPU left as it was
    assert not hasattr(new_matmul, "allow_tf32")  # the deprecated flags are left alone
    old_matmul = types.SimpleNamespace(allow_tf32=False)  # torch < 2.9
    monkeypatch.setattr(torch.backends.cuda, "matmul", old_matmul)
    monkeypatch.delattr(torch.backends.cudnn, "conv")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    training.enable_cuda_speedups()
    assert old_matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_cuda_speedups_leave_the_global_matmul_precision_readable():
    """``cuda.matmul.fp32_precision = "tf32"`` alone makes ``torch.get_float32_matmul_precision()``
    raise, which inductor's autotuning reads: torch.compile then fails on CUDA. Checked on this torch's
    real settings, in a process of its own (they are process-wide)."""
    script = (
        "import torch\n"
        "from stages import training\n"
        "training.enable_cuda_speedups()\n"
        "print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,"
        " torch.backends.cudnn.allow_tf32, torch.backends.mkldnn.matmul.fp32_precision)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["high", "True", "True", "none"]
