"""Stage ``train_gcn``: train one CTR-GCN stream (joint, bone, joint_motion or bone_motion).

DVC runs it once per stream (``foreach`` over ``train.streams``). Each epoch: a pass over the train
split of ``train.benchmark`` with the chosen recipe, an evaluation on its test split every
``eval_every`` epochs (centre clip), and an atomic checkpoint. Outputs:

- ``--out-dir``: ``last.pt`` (every epoch), ``best.pt`` (best test top-1 so far) and
  ``config.yaml`` (the resolved configuration). Checkpoints
  carry the model config, optimiser, EMA, RNG states, epoch and history, and load with
  ``torch.load(weights_only=True)``. ``--resume`` continues from ``last.pt`` exactly: a killed run
  resumed ends with the same weights as an uninterrupted one (same seed, CPU).
- ``--reports-dir``: ``metrics.json`` (DVC metrics) and ``history.csv`` (per-epoch loss/accuracy,
  DVC plots).
- MLflow (unless ``--no-mlflow``): params, per-epoch metrics, the checkpoint, the resolved config.

Under ``torchrun`` (DDP) the recipe's ``batch_size`` is the global batch: each of the N processes
takes ``batch_size / N`` (it must divide), so the learning rate needs no scaling and N processes train
the same recipe as one. Every rank must resume from the same ``last.pt``.

    python -m stages.train_gcn --stream joint --features-dir data/features \\
        --out-dir data/checkpoints/joint --reports-dir data/reports/train/joint [--resume]
    torchrun --nproc-per-node 2 -m stages.train_gcn ...      # DDP (NCCL on GPUs, gloo on CPU)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from models.ctrgcn import CTRGCN, CTRGCNConfig, config_for, count_parameters
from models.features import STREAMS
from stages import training
from stages.dataset import LoaderParams, SkeletonDataset, make_loader, set_loader_epoch
from stages.ntu_files import BENCHMARKS
from stages.params import ParamsError, load_section
from stages.store import atomic_file, write_metrics
from stages.tracking import NullTracker, Tracker, flatten, mlflow_run
from stages.training import Recipe


@dataclass(frozen=True)
class Recipes:
    """``train.recipes``: the two published recipes, both complete (select one with ``train.recipe``)."""

    ctrgcn: Recipe  # CTR-GCN: SGD Nesterov lr 0.1, wd 4e-4, batch 64, 5 warm-up epochs, steps
    adamw: Recipe  # AdamW + cosine + label smoothing + EMA


@dataclass(frozen=True)
class TrainParams:
    """The ``train`` section of params.yaml (``evaluate`` reads it too)."""

    recipes: Recipes
    benchmark: str = "ntu120_xsub"
    streams: tuple[str, ...] = ("joint", "bone")
    model: Literal["small", "full"] = "small"
    dropout: float = 0.0
    recipe: Literal["ctrgcn", "adamw"] = "adamw"
    seed: int = 1
    workers: int = 1  # loader processes per rank
    eval_every: int = 1  # test-split evaluation every N epochs (and always after the last)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # auto: torch.compile on CUDA

    def validate(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ParamsError(
                f"params.yaml [train] benchmark: {self.benchmark!r}; valid: {', '.join(BENCHMARKS)}"
            )
        bad = [s for s in self.streams if s not in STREAMS]
        if bad or not self.streams or len(set(self.streams)) != len(self.streams):
            raise ParamsError(
                f"params.yaml [train] streams: {list(self.streams)}; each once, from {', '.join(STREAMS)}"
            )
        if self.eval_every < 1 or self.workers < 0 or not 0 <= self.dropout < 1:
            raise ParamsError("params.yaml [train]: eval_every >= 1, workers >= 0, 0 <= dropout < 1")

    @property
    def active_recipe(self) -> Recipe:
        return getattr(self.recipes, self.recipe)


HISTORY_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "test_top1",
    "test_top5",
    "samples",
    "samples_per_s",
    "seconds",
)


def fingerprint(resolved: dict) -> str:
    """Hash of everything that determines the training run (a checkpoint resumes only a matching run)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _loaders(
    features_dir: Path, stream: str, params: TrainParams, loader: LoaderParams, rt: training.Runtime
):
    recipe = params.active_recipe
    if recipe.batch_size % rt.world_size:
        raise ParamsError(
            f"params.yaml [train.recipes.{params.recipe}] batch_size {recipe.batch_size} is the global "
            f"batch, split evenly over the {rt.world_size} processes: use a multiple of {rt.world_size}"
        )
    per_rank = recipe.batch_size // rt.world_size
    train_set, test_set = (
        SkeletonDataset(
            features_dir,
            stream=stream,
            benchmark=params.benchmark,
            split=split,
            params=loader,
            train=split == "train",
            seed=params.seed,
        )
        for split in ("train", "test")
    )
    if len(train_set) < recipe.batch_size:
        raise ValueError(
            f"{features_dir}: {len(train_set)} training samples in {params.benchmark} cannot fill one batch "
            f"of {recipe.batch_size}; lower the recipe's batch_size or add data"
        )
    if len(test_set) == 0:  # found before training, not at the first evaluation
        raise ValueError(
            f"{features_dir}: the test split of {params.benchmark} is empty: nothing to evaluate on"
        )
    pin = rt.device.type == "cuda"
    train_loader = make_loader(
        train_set,
        per_rank,
        shuffle=True,
        num_workers=params.workers,
        seed=params.seed,
        drop_last=True,
        rank=rt.rank,
        world_size=rt.world_size,
        pin_memory=pin,
    )
    test_loader = make_loader(
        test_set, 2 * recipe.batch_size, shuffle=False, num_workers=params.workers, pin_memory=pin
    )
    return train_set, train_loader, test_loader


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})


def _differences(saved: dict | None, now: dict) -> str:
    """What differs between a checkpoint's resolved config and this run's, key by key."""
    if saved is None:
        return "the checkpoint predates the stored configuration, so which keys differ is not known"
    a, b = flatten(saved), flatten(now)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "(absent)") != b.get(k, "(absent)"))
    if not keys:
        return "the code that resolves the configuration has changed"
    shown = "; ".join(f"{k}: {a.get(k, '(absent)')!r} there, {b.get(k, '(absent)')!r} now" for k in keys[:8])
    return shown + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")


def read_resume_checkpoint(path: Path, resolved: dict, run_id: str) -> tuple[dict | None, str | None]:
    """``last.pt`` for ``--resume``: ``(checkpoint, None)``, ``(None, None)`` when there is none, or
    ``(None, why it is refused)``: a file that cannot be read, or one from other parameters."""
    if not path.exists():
        return None, None
    what_to_do = "delete it or run without --resume"
    try:
        ckpt = training.load_checkpoint(path)
    except Exception as exc:  # truncated, corrupt or not a checkpoint: torch raises many kinds
        ckpt, unreadable = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        unreadable = None if isinstance(ckpt, dict) and "epoch" in ckpt else "not a training checkpoint"
    if unreadable is not None:
        return None, f"{path} cannot be read ({unreadable}); {what_to_do}"
    if ckpt.get("fingerprint") != run_id:
        why = _differences(ckpt.get("resolved"), resolved)
        return None, f"{path} comes from a run with other parameters ({why}); {what_to_do}"
    return ckpt, None


def resume_disagreement(path: Path, views: list[dict]) -> str | None:
    """Why the ranks cannot resume together, from each rank's view of ``last.pt`` (``host``,
    ``problem`` and ``checkpoint``: ``(epoch, step, fingerprint)`` or ``None``); ``None`` when they
    agree. Ranks on nodes with their own disks see different files, and would resume silently from
    different epochs."""
    for rank, view in enumerate(views):
        if view["problem"] is not None:
            return view["problem"] if len(views) == 1 else f"rank {rank} ({view['host']}): {view['problem']}"
    if len({view["checkpoint"] for view in views}) == 1:
        return None
    seen = ", ".join(
        f"rank {rank} ({view['host']}) "
        + (f"epoch {view['checkpoint'][0]}" if view["checkpoint"] else "no checkpoint")
        for rank, view in enumerate(views)
    )
    return (
        f"the ranks see different checkpoints at {path} ({seen}); resume with --out-dir on a filesystem "
        "every node shares, or copy the same last.pt to every node"
    )


@dataclass
class Prepared:
    """A stream ready to train (:func:`prepare`): runtime, data, model and optimiser, and the state a
    resumed run continues from."""

    stream: str
    params: TrainParams
    loader_params: LoaderParams
    rt: training.Runtime
    train_set: SkeletonDataset
    train_loader: DataLoader
    test_loader: DataLoader
    cfg: CTRGCNConfig
    resolved: dict  # everything that determines the run (config.yaml, MLflow params)
    run_id: str  # its fingerprint
    model: nn.Module
    ema: training.EMA | None
    optimizer: torch.optim.Optimizer
    out_dir: Path
    start_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"test_top1": -1.0, "epoch": 0})
    mlflow_run_id: str | None = None  # the MLflow run a resumed checkpoint names


def prepare(
    params: TrainParams,
    loader_params: LoaderParams,
    *,
    stream: str,
    features_dir: Path,
    out_dir: Path,
    resume: bool = False,
) -> Prepared:
    """Everything before the first epoch: runtime, loaders, model and optimiser; with ``resume``, the
    state of ``out_dir/last.pt``. A checkpoint that cannot be read or comes from other parameters is
    refused (``ValueError``) before anything is logged; under DDP all ranks must see the same one."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; valid: {', '.join(STREAMS)}")
    rt = training.setup_runtime(params.device, params.amp, params.compile)
    recipe = params.active_recipe
    train_set, train_loader, test_loader = _loaders(features_dir, stream, params, loader_params, rt)
    cfg = config_for(params.model, train_set.num_classes, dropout=params.dropout)
    resolved = {
        "stream": stream,
        "train": dataclasses.asdict(params),
        "recipe": dataclasses.asdict(recipe),
        "loader": dataclasses.asdict(loader_params),
        "model": cfg.to_dict(),
        "world_size": rt.world_size,
    }
    if rt.world_size > 1:  # batch_size became the global batch: a checkpoint of the per-rank one is refused
        resolved["batch_per_rank"] = recipe.batch_size // rt.world_size
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = CTRGCN(cfg).to(rt.device)
    ema = training.build_ema(model, recipe.ema_decay)
    optimizer = training.build_optimizer(model, recipe, rt)
    prep = Prepared(
        stream=stream,
        params=params,
        loader_params=loader_params,
        rt=rt,
        train_set=train_set,
        train_loader=train_loader,
        test_loader=test_loader,
        cfg=cfg,
        resolved=resolved,
        run_id=fingerprint(resolved),
        model=model,
        ema=ema,
        optimizer=optimizer,
        out_dir=out_dir,
    )
    last_path = out_dir / "last.pt"
    ckpt, problem = None, None
    if resume:
        ckpt, problem = read_resume_checkpoint(last_path, _plain(resolved), prep.run_id)
    seen = None if ckpt is None else (ckpt["epoch"], ckpt["step"], ckpt["fingerprint"])
    views = training.gather_from_ranks({"host": socket.gethostname(), "problem": problem, "checkpoint": seen})
    refusal = resume_disagreement(last_path, views)
    if refusal is not None:
        raise ValueError(refusal)
    if ckpt is None:
        if resume and rt.is_main:
            print(f"no checkpoint at {last_path}; starting from scratch")
        if rt.rank:  # dropout masks of their own on the other ranks (rank 0 keeps the seed)
            torch.manual_seed(params.seed + rt.rank)
        return prep
    model.load_state_dict(ckpt["model"])
    training.load_optimizer_state(optimizer, ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    rank_rng = ckpt.get("rank_rng") or [ckpt["rng"]]  # every rank's states (DDP), else rank 0's
    training.set_rng_state(rank_rng[rt.rank] if rt.rank < len(rank_rng) else ckpt["rng"])
    if rt.rank >= len(rank_rng):  # a DDP checkpoint from before the per-rank states
        torch.manual_seed(params.seed + rt.rank)
    prep.start_epoch, prep.step, prep.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
    prep.best, prep.mlflow_run_id = ckpt["best"], ckpt.get("mlflow_run_id")
    if rt.is_main:
        print(f"resuming {stream} from epoch {prep.start_epoch} ({last_path})")
    return prep


def _plain(resolved: dict) -> dict:
    """``resolved`` as JSON types (tuples as lists), as the checkpoint stores it for ``weights_only``."""
    return json.loads(json.dumps(resolved, default=str))


def _log_epoch(tracker: Tracker, row: dict) -> None:
    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch" and v is not None}, step=row["epoch"])


def run(
    params: TrainParams,
    loader_params: LoaderParams,
    *,
    stream: str,
    features_dir: Path,
    out_dir: Path,
    reports_dir: Path,
    resume: bool = False,
    tracker: Tracker | None = None,
) -> dict:
    """Train ``stream`` and write checkpoints and reports; returns the final metrics."""
    prep = prepare(
        params, loader_params, stream=stream, features_dir=features_dir, out_dir=out_dir, resume=resume
    )
    return fit(prep, reports_dir=reports_dir, tracker=tracker)


def fit(prep: Prepared, *, reports_dir: Path, tracker: Tracker | None = None) -> dict:
    """Train a :func:`prepare`d stream from its start epoch; writes checkpoints and reports, returns
    the final metrics. A resumed run's tracker gets the epochs it lacks, so a run killed between a
    checkpoint and its logging still ends with every epoch logged once."""
    tracker = tracker or NullTracker()
    params, rt, stream, run_id = prep.params, prep.rt, prep.stream, prep.run_id
    model, ema, optimizer, recipe = prep.model, prep.ema, prep.optimizer, params.active_recipe
    step, history, best = prep.step, prep.history, prep.best
    last_path, best_path = prep.out_dir / "last.pt", prep.out_dir / "best.pt"
    ddp = rt.world_size > 1
    train_model: nn.Module = model
    if ddp:
        train_model = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if rt.compile:
        train_model = torch.compile(train_model)
    eval_model = ema.module if ema is not None else model
    num_params = count_parameters(model)

    if rt.is_main:
        tracker.log_params({**prep.resolved, "parameters": num_params})
        tracker.set_tags({"stream": stream, "device": str(rt.device), "fingerprint": run_id})
        logged = tracker.metric_steps("train_loss") if history else set()
        for row in history:
            if row["epoch"] not in logged:
                _log_epoch(tracker, row)
        print(
            f"train_gcn {stream}: {len(prep.train_set)} train samples, {params.model} CTR-GCN "
            f"({num_params:,} params), recipe {params.recipe}, "
            f"{recipe.epochs} epochs on {rt.device}"
            + (f" x{rt.world_size} ({recipe.batch_size // rt.world_size} per batch each)" if ddp else "")
            + (", bf16" if rt.amp_dtype else "")
            + (", compiled" if rt.compile else "")
        )
    steps_per_epoch = len(prep.train_loader)
    prep.out_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(prep.start_epoch, recipe.epochs):
        set_loader_epoch(prep.train_loader, epoch)
        lr = training.lr_at(recipe, step, steps_per_epoch)
        stats, step = training.train_one_epoch(
            train_model,
            prep.train_loader,
            optimizer,
            recipe=recipe,
            runtime=rt,
            step=step,
            steps_per_epoch=steps_per_epoch,
            ema=ema,
            desc=f"{stream} {epoch + 1}/{recipe.epochs}",
        )
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": round(stats.loss, 5),
            "train_top1": round(stats.top1, 5),
            "test_top1": None,
            "test_top5": None,
            "samples": stats.samples,
            "samples_per_s": round(stats.samples_per_s, 2),
            "seconds": round(stats.seconds, 2),
        }
        if rt.is_main and ((epoch + 1) % params.eval_every == 0 or epoch + 1 == recipe.epochs):
            scores, labels = training.predict(eval_model, prep.test_loader, rt, desc=f"{stream} test")
            row["test_top1"] = round(training.topk_accuracy(scores, labels, 1), 5)
            row["test_top5"] = round(training.topk_accuracy(scores, labels, 5), 5)
        history.append(row)
        # every rank's RNG states, so that a resumed DDP run draws what each rank would have drawn
        rank_rng = training.gather_from_ranks(training.rng_state()) if ddp else None
        if rt.is_main:
            is_best = row["test_top1"] is not None and row["test_top1"] > best["test_top1"]
            if is_best:
                best = {"test_top1": row["test_top1"], "epoch": epoch + 1}
            payload = {
                "kind": "ctrgcn_stream",
                "stream": stream,
                "benchmark": params.benchmark,
                "config": prep.cfg.to_dict(),
                "class_names": list(prep.train_set.class_names),
                "loader": dataclasses.asdict(prep.loader_params),
                **training.resumable_state(
                    model, ema, optimizer, fingerprint=run_id, epoch=epoch + 1, step=step, history=history
                ),
                "best": best,
                "mlflow_run_id": tracker.run_id,  # a resumed run goes on logging into it
                "resolved": _plain(prep.resolved),  # a refused --resume names the keys that differ
                **({"rank_rng": rank_rng} if rank_rng is not None else {}),
            }
            if is_best:  # first: a run killed between the two redoes this epoch from the previous last.pt
                training.save_checkpoint(best_path, payload)
            training.save_checkpoint(last_path, payload)
            _write_history(reports_dir / "history.csv", history)
            _log_epoch(tracker, row)
            test = f", test top-1 {row['test_top1']:.4f}" if row["test_top1"] is not None else ""
            print(
                f"{stream} epoch {epoch + 1}/{recipe.epochs}: loss {stats.loss:.4f}, "
                f"train top-1 {stats.top1:.4f}"
                f"{test}, {stats.samples_per_s:.1f} samples/s"
            )
        if ddp:
            torch.distributed.barrier()

    final = history[-1] if history else {}
    metrics = {
        "stream": stream,
        "epochs": recipe.epochs,
        "test_top1": final.get("test_top1"),
        "test_top5": final.get("test_top5"),
        "best_test_top1": best["test_top1"],
        "best_epoch": best["epoch"],
        "train_loss": final.get("train_loss"),
        "samples_per_s": round(
            sum(h["samples_per_s"] * h["seconds"] for h in history)
            / max(sum(h["seconds"] for h in history), 1e-9),
            2,
        ),
        "train_seconds": round(sum(h["seconds"] for h in history), 1),
        "parameters": num_params,
    }
    if rt.is_main:
        # also when a resumed run had no epoch left (killed after the last checkpoint)
        _write_history(reports_dir / "history.csv", history)
        write_metrics(reports_dir / "metrics.json", metrics)
        if not best_path.exists() and last_path.exists():
            training.save_checkpoint(best_path, training.load_checkpoint(last_path))
        if not tracker.metric_steps("final_test_top1"):
            tracker.log_metrics({"final_test_top1": metrics["test_top1"] or math.nan})
        tracker.log_artifact(last_path, "checkpoints")
        tracker.log_artifact(reports_dir / "history.csv", "reports")
        resolved_path = prep.out_dir / "config.yaml"
        resolved_text = yaml.safe_dump(json.loads(json.dumps(prep.resolved, default=list)), sort_keys=False)
        with atomic_file(resolved_path) as tmp:
            tmp.write_text(resolved_text)
        tracker.log_artifact(resolved_path, "reports")
    if ddp:
        torch.distributed.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--stream", required=True, choices=STREAMS)
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--features-dir", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path, help="checkpoints (last.pt, best.pt)")
    ap.add_argument("--reports-dir", required=True, type=Path, help="metrics.json, history.csv")
    ap.add_argument("--resume", action="store_true", help="continue from --out-dir/last.pt")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (quick runs)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "train", TrainParams)
        if args.epochs is not None:
            recipe = dataclasses.replace(params.active_recipe, epochs=args.epochs)
            recipes = dataclasses.replace(params.recipes, **{params.recipe: recipe})
            params = dataclasses.replace(params, recipes=recipes)
        loader_params = load_section(args.params, "loader", LoaderParams)
        # checked (and a resume refused) before an MLflow run is opened: a refused --resume must not
        # reopen the checkpoint's finished run and leave it FAILED
        prep = prepare(
            params,
            loader_params,
            stream=args.stream,
            features_dir=args.features_dir,
            out_dir=args.out_dir,
            resume=args.resume,
        )
        if args.no_mlflow or not prep.rt.is_main:
            fit(prep, reports_dir=args.reports_dir)
        else:
            name = f"train_gcn@{args.stream}"
            with mlflow_run(params.benchmark, name, name, prep.mlflow_run_id) as tracker:
                fit(prep, reports_dir=args.reports_dir, tracker=tracker)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"train_gcn: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return training.interrupted(f"train_gcn@{args.stream}", args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
