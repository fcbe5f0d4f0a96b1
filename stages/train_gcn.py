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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.ctrgcn import CTRGCN, config_for, count_parameters
from models.features import STREAMS
from stages import training
from stages.dataset import LoaderParams, SkeletonDataset, make_loader, set_loader_epoch
from stages.ntu_files import BENCHMARKS
from stages.params import ParamsError, load_section
from stages.store import write_metrics
from stages.tracking import NullTracker, Tracker, mlflow_run
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
    if len(train_set) < recipe.batch_size * rt.world_size:
        raise ValueError(
            f"{features_dir}: {len(train_set)} training samples in {params.benchmark} cannot fill one batch "
            "of "
            f"{recipe.batch_size} per rank; lower the recipe's batch_size or add data"
        )
    if len(test_set) == 0:  # found before training, not at the first evaluation
        raise ValueError(
            f"{features_dir}: the test split of {params.benchmark} is empty: nothing to evaluate on"
        )
    train_loader = make_loader(
        train_set,
        recipe.batch_size,
        shuffle=True,
        num_workers=params.workers,
        seed=params.seed,
        drop_last=True,
        rank=rt.rank,
        world_size=rt.world_size,
    )
    test_loader = make_loader(test_set, 2 * recipe.batch_size, shuffle=False, num_workers=params.workers)
    return train_set, train_loader, test_loader


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    tmp.replace(path)


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
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; valid: {', '.join(STREAMS)}")
    tracker = tracker or NullTracker()
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
    run_id = fingerprint(resolved)

    torch.manual_seed(params.seed)
    model = CTRGCN(cfg).to(rt.device)
    ema = training.build_ema(model, recipe.ema_decay)
    optimizer = training.build_optimizer(model, recipe, rt)
    start_epoch, step, history, best = 0, 0, [], {"test_top1": -1.0, "epoch": 0}
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.exists():
        ckpt = training.load_checkpoint(last_path)
        if ckpt.get("fingerprint") != run_id:
            raise ValueError(
                f"{last_path} comes from a run with other parameters (or code-level config); "
                "delete it or run without --resume"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        training.set_rng_state(ckpt["rng"])
        start_epoch, step, history, best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        if rt.is_main:
            print(f"resuming {stream} from epoch {start_epoch} ({last_path})")
    elif resume and rt.is_main:
        print(f"no checkpoint at {last_path}; starting from scratch")

    train_model: nn.Module = model
    if rt.world_size > 1:
        train_model = DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if rt.compile:
        train_model = torch.compile(train_model)
    eval_model = ema.module if ema is not None else model
    num_params = count_parameters(model)

    if rt.is_main:
        tracker.log_params({**resolved, "parameters": num_params})
        tracker.set_tags({"stream": stream, "device": str(rt.device), "fingerprint": run_id})
        print(
            f"train_gcn {stream}: {len(train_set)} train samples, {params.model} CTR-GCN "
            f"({num_params:,} params), recipe {params.recipe}, "
            f"{recipe.epochs} epochs on {rt.device}"
            + (f" x{rt.world_size}" if rt.world_size > 1 else "")
            + (", bf16" if rt.amp_dtype else "")
            + (", compiled" if rt.compile else "")
        )
    steps_per_epoch = len(train_loader)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, recipe.epochs):
        set_loader_epoch(train_loader, epoch)
        lr = training.lr_at(recipe, step, steps_per_epoch)
        stats, step = training.train_one_epoch(
            train_model,
            train_loader,
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
            scores, labels = training.predict(eval_model, test_loader, rt, desc=f"{stream} test")
            row["test_top1"] = round(training.topk_accuracy(scores, labels, 1), 5)
            row["test_top5"] = round(training.topk_accuracy(scores, labels, 5), 5)
        history.append(row)
        if rt.is_main:
            is_best = row["test_top1"] is not None and row["test_top1"] > best["test_top1"]
            if is_best:
                best = {"test_top1": row["test_top1"], "epoch": epoch + 1}
            payload = {
                "kind": "ctrgcn_stream",
                "stream": stream,
                "benchmark": params.benchmark,
                "config": cfg.to_dict(),
                "class_names": list(train_set.class_names),
                "loader": dataclasses.asdict(loader_params),
                **training.resumable_state(
                    model, ema, optimizer, fingerprint=run_id, epoch=epoch + 1, step=step, history=history
                ),
                "best": best,
                "mlflow_run_id": tracker.run_id,  # a resumed run goes on logging into it
            }
            if is_best:  # first: a run killed between the two redoes this epoch from the previous last.pt
                training.save_checkpoint(best_path, payload)
            training.save_checkpoint(last_path, payload)
            _write_history(reports_dir / "history.csv", history)
            tracker.log_metrics(
                {k: v for k, v in row.items() if k != "epoch" and v is not None}, step=epoch + 1
            )
            test = f", test top-1 {row['test_top1']:.4f}" if row["test_top1"] is not None else ""
            print(
                f"{stream} epoch {epoch + 1}/{recipe.epochs}: loss {stats.loss:.4f}, "
                f"train top-1 {stats.top1:.4f}"
                f"{test}, {stats.samples_per_s:.1f} samples/s"
            )
        if rt.world_size > 1:
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
        write_metrics(reports_dir / "metrics.json", metrics)
        if not best_path.exists() and last_path.exists():
            training.save_checkpoint(best_path, training.load_checkpoint(last_path))
        tracker.log_metrics({"final_test_top1": metrics["test_top1"] or math.nan})
        tracker.log_artifact(last_path, "checkpoints")
        tracker.log_artifact(reports_dir / "history.csv", "reports")
        resolved_path = out_dir / "config.yaml"
        resolved_path.write_text(
            yaml.safe_dump(json.loads(json.dumps(resolved, default=list)), sort_keys=False)
        )
        tracker.log_artifact(resolved_path, "reports")
    if rt.world_size > 1:
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
        kwargs = dict(
            stream=args.stream,
            features_dir=args.features_dir,
            out_dir=args.out_dir,
            reports_dir=args.reports_dir,
            resume=args.resume,
        )
        is_main = int(os.environ.get("RANK", "0")) == 0
        if args.no_mlflow or not is_main:
            run(params, loader_params, **kwargs)
        else:
            last = args.out_dir / "last.pt"
            resume_id = (
                training.load_checkpoint(last).get("mlflow_run_id") if args.resume and last.exists() else None
            )
            with mlflow_run(
                params.benchmark, f"train_gcn@{args.stream}", f"train_gcn@{args.stream}", resume_id
            ) as tracker:
                run(params, loader_params, tracker=tracker, **kwargs)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"train_gcn: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
