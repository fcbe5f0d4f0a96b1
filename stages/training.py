"""Training building blocks as free functions: recipes, runtime set-up, one epoch, prediction, checkpoints.

Used by ``stages.train_gcn`` (and later by the pose trainer). Nothing here imports MLflow, Prefect or
DVC; the stage passes a tracker in.

Runtime: on CUDA, bf16 autocast, TF32 matmuls, cudnn autotuning, ``torch.compile`` and the fused
optimiser kernels; on CPU, fp32 with one intra-op thread per core (per process under ``torchrun``).
Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
CUDA, gloo on CPU) and each rank reads its own part of every epoch.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from stages.params import ParamsError, torch_threads


@dataclass(frozen=True)
class Recipe:
    """One optimisation recipe (a sub-section of ``train.recipes`` in params.yaml)."""

    optimizer: Literal["sgd", "adamw"]
    lr: float  # peak learning rate, for batch_size
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_epochs: float = 0.0  # linear warm-up from 0, per iteration
    schedule: Literal["step", "cosine"] = "cosine"
    lr_steps: tuple[int, ...] = ()  # epochs where the step schedule multiplies lr by lr_decay
    lr_decay: float = 0.1
    min_lr: float = 0.0  # cosine floor
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # exponential moving average of the weights (0: off); evaluated when on

    def validate(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.warmup_epochs < 0:
            raise ParamsError(
                "params.yaml [train.recipes]: lr > 0, batch_size >= 1, epochs >= 1, warmup >= 0"
            )
        if not 0 <= self.ema_decay < 1 or not 0 <= self.label_smoothing < 1:
            raise ParamsError("params.yaml [train.recipes]: ema_decay and label_smoothing must be in [0, 1)")


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then step or cosine decay."""
    epoch = step / steps_per_epoch
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (step + 1) / (recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "step":
        return recipe.lr * recipe.lr_decay ** sum(epoch >= s for s in recipe.lr_steps)
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-9)
    progress = min((epoch - recipe.warmup_epochs) / span, 1.0)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: device, autocast dtype, compile, distributed rank."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(device: str = "auto", amp: str = "auto", compile: str = "auto") -> Runtime:
    """Choose the device and speed-ups; joins the process group when started by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available (use auto or cpu)")
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        enable_cuda_speedups()
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(torch_threads(world_size))
        keep_large_allocations()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and dev.type == "cuda")) else None
    use_compile = compile == "on" or (compile == "auto" and dev.type == "cuda")
    return Runtime(dev, amp_dtype, use_compile, rank, world_size)


def enable_cuda_speedups() -> None:
    """TF32 for fp32 matmuls and convolutions, and cudnn autotuning (process-wide CUDA settings).

    torch >= 2.9 sets TF32 per backend (``fp32_precision``) and deprecates the ``allow_tf32`` flags
    (older torch has only those). The per-backend matmul setting alone leaves the global one behind,
    and ``torch.get_float32_matmul_precision()`` then raises ("mix of the legacy and new APIs");
    inductor's autotuning still reads it, so ``torch.compile`` fails on CUDA (pytorch/pytorch#166387).
    ``set_float32_matmul_precision("high")`` moves both; the CPU (oneDNN) matmuls it also switches to
    TF32 are put back as they were.
    """
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    cpu_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if conv is not None and cpu_matmul is not None and hasattr(matmul, "fp32_precision"):
        cpu = cpu_matmul.fp32_precision
        torch.set_float32_matmul_precision("high")
        cpu_matmul.fp32_precision = cpu
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def keep_large_allocations() -> None:
    """Serve large CPU tensors from the heap instead of fresh ``mmap``s (glibc only; no-op elsewhere).

    glibc maps every allocation above 32 MiB anew and returns it on free, so each big activation
    page-faults on first touch: measured here, batch-64 inference of the small model ran at 55
    samples/s with the default and 122 with this (the usual alternative is preloading jemalloc).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def build_optimizer(model: nn.Module, recipe: Recipe, runtime: Runtime) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over all parameters; fused kernels on CUDA."""
    extra = {"fused": True} if runtime.device.type == "cuda" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
            **extra,
        )
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the kernel choice (``fused``, ``foreach``) this
    runtime made: a plain load restores the saved groups' flags, so a CPU checkpoint resumed on a GPU
    would run unfused and a GPU one resumed on a CPU fused. The states are cast for the kept choice
    (fused kernels keep ``step`` on the parameters' device)."""
    groups = [
        {**saved, **{k: mine[k] for k in ("fused", "foreach") if k in mine}}
        for saved, mine in zip(state["param_groups"], optimizer.param_groups, strict=False)
    ]  # (a count that differs is load_state_dict's error to report)
    optimizer.load_state_dict({**state, "param_groups": groups})


class EMA(nn.Module):
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay
    (``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages do not drag in the
    random initialisation). BatchNorm statistics are copied from the model rather than averaged:
    averaged running variances do not match averaged weights, which costs accuracy on short runs."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        self.updates += 1
        n = float(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)


def build_ema(model: nn.Module, decay: float) -> EMA | None:
    """The recipe's weight average (``None`` when ``decay`` is 0)."""
    return EMA(model, decay) if decay > 0 else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def show_progress(runtime: Runtime) -> bool:
    """Progress bars on the main rank when stderr is a terminal (logs get one line per epoch instead)."""
    return runtime.is_main and sys.stderr.isatty()


@dataclass
class EpochStats:
    loss: float
    top1: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def optimizer_step(loss: torch.Tensor, model, optimizer, ema, step: int, what: str = "training loss") -> None:
    """One update from ``loss``: a non-finite loss stops training with the step it happened at; else
    zero_grad, backward, step, and the EMA (when there is one) follows the model.

    Under DDP the ranks agree first (one all-reduce of the flag): a rank that stopped alone would
    leave the others waiting in backward for its gradients, for ever."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32)
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad):
        where = " on another rank" if torch.isfinite(loss) else ""
        raise FloatingPointError(f"non-finite {what}{where} at step {step}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if ema is not None:
        ema.update(model)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    recipe: Recipe,
    runtime: Runtime,
    step: int,
    steps_per_epoch: int,
    ema: nn.Module | None = None,
    desc: str = "train",
) -> tuple[EpochStats, int]:
    """One pass over ``loader``; returns the epoch's statistics (all ranks) and the next step number."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
    start = time.perf_counter()
    bar = tqdm(
        loader, desc=desc, leave=False, disable=not show_progress(runtime), mininterval=1.0, unit="batch"
    )
    for x, y in bar:
        x = x.to(runtime.device, non_blocking=True)
        y = y.to(runtime.device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step, steps_per_epoch)
        with runtime.autocast():
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer_step(loss, model, optimizer, ema, step)
        step += 1
        n = y.shape[0]
        correct = (logits.detach().argmax(1) == y).sum()
        totals += torch.tensor([loss.item() * n, correct.item(), n], dtype=torch.float64)
        rate = totals[2].item() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{totals[0].item() / totals[2].item():.3f}", samples_s=f"{rate:.1f}")
    loss_sum, correct, count = sum_over_ranks(totals, runtime).tolist()
    stats = EpochStats(
        loss_sum / max(count, 1), correct / max(count, 1), int(count), time.perf_counter() - start
    )
    return stats, step


def sum_over_ranks(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Element-wise sum of ``values`` over the ranks (``values`` itself in one process), on the
    runtime's device: the collective runs on a device copy, since NCCL has no CPU tensors."""
    if runtime.world_size == 1:
        return values
    on_device = values.to(runtime.device)
    dist.all_reduce(on_device)
    return on_device


def gather_from_ranks(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process); every rank must call it."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def average_clips(scores: torch.Tensor, clips: int) -> torch.Tensor:
    """Scores ``(..., N*clips, K)`` of consecutive clips per sample -> ``(..., N, K)``: the clips'
    softmax probabilities averaged (pyskl's ``average_clips='prob'``), returned as log-probabilities."""
    grouped = scores.reshape(*scores.shape[:-2], -1, clips, scores.shape[-1])  # ..., N, clips, K
    return torch.softmax(grouped, -1).mean(-2).clamp_min(1e-12).log()


@torch.inference_mode()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    runtime: Runtime,
    *,
    desc: str = "test",
) -> tuple[np.ndarray, np.ndarray]:
    """Class scores ``(N, K)`` (float32 logits; multi-clip inputs ``(N, clips, ...)`` averaged as
    softmax probabilities, then returned as log-probabilities) and labels ``(N,)``."""
    if isinstance(model, nn.Module):
        model.eval()
    scores, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not show_progress(runtime), mininterval=1.0):
        x = x.to(runtime.device, non_blocking=True)
        clips = x.shape[1] if x.dim() == 6 else 0
        if clips:
            x = x.flatten(0, 1)  # N*clips, C, T, V, M
        with runtime.autocast():
            out = model(x).float()
        if clips:
            out = average_clips(out, clips)
        scores.append(out.cpu())
        labels.append(y)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


# ---- checkpoints -------------------------------------------------------------------------------


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global RNG third-party code may use)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = np.array(n["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        # saved where more GPUs were visible: restore those this process has
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def resumable_state(model, ema, optimizer, *, fingerprint: str, epoch: int, step: int, history: list) -> dict:
    """The part of an epoch checkpoint that ``--resume`` continues from (the caller adds its model
    config and its own keys): weights, EMA, optimiser, RNG states, position and history."""
    return {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "eval_weights": "ema" if ema is not None else "model",
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "history": history,
    }


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically (temporary file, then rename): a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def interrupted(stage: str, out_dir: Path) -> int:
    """What a training stage says when Ctrl-C (or ``dvc repro``'s) stops it, instead of a traceback:
    where it can go on from. Returns 130, the shell's status for SIGINT."""
    last = Path(out_dir) / "last.pt"
    if last.exists():
        how = f"{last} holds the last finished epoch: the same command with --resume goes on from it"
    else:
        how = f"no epoch finished (no {last})"
    print(f"{stage}: interrupted; {how}", file=sys.stderr)
    return 130


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def eval_state_dict(ckpt: dict) -> dict:
    """The weights a checkpoint is evaluated with: the EMA when the recipe kept one, else the model."""
    if ckpt.get("eval_weights") == "ema" and ckpt.get("ema") is not None:
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "updates"}
    return ckpt["model"]
