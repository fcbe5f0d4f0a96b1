"""Stage ``finetune_video``: the action model fine-tuned on the pose estimator's skeletons.

``python -m stages.finetune_video --params params.yaml --model data/evaluate/model.pt
--skeletons data/video_skeletons --features-dir data/features --out-dir data/video_model
--reports-dir data/reports/finetune_video``

The action model was trained on Kinect skeletons; on the estimator's skeletons of held-out videos it
loses about 45 points (README). Teaching it the estimator's faults by simulation (joint noise, swaps,
dropped people) gained nothing; training it on the estimator's own output gains 15-17 points and costs
nothing on Kinect skeletons (README, measured before this stage existed). So this stage starts from
``evaluate``'s fused model and trains it further on the training videos' estimated skeletons
(:mod:`stages.video_skeletons`) and, with ``true_skeletons``, on the same samples' ``.skeleton``
joints, every stream with its own cross-entropy (a score-sum fusion keeps its weights; a learned
fusion head is fitted again on the fine-tuned streams, as ``evaluate`` fits it).
Inputs get the pipeline's normalisation (:func:`stages.features.normalise`) and the training crop and
resize of the loader (:func:`stages.dataset.sample_clips`), as the streams were trained.

Nothing of the held-out performers is used. Outputs: ``model.pt`` in ``--out-dir`` (the format of
``evaluate``'s, so ``stages.export`` exports it: the video path's bundle), and in ``--reports-dir``
``metrics.json`` (the fine-tuned model's top-1 on the ``.skeleton`` test split beside ``evaluate``'s
figure, its fit on the training skeletons) and ``history.csv``. The run is tracked in MLflow.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from models import sampling
from models.two_stream import fit_fusion_head
from stages import training, video_skeletons
from stages.dataset import LoaderParams, SkeletonDataset, make_loader, sample_clips
from stages.export import ExportError, load_fused
from stages.features import FeaturesParams, normalise
from stages.params import ParamsError, load_section
from stages.store import write_metrics
from stages.tracking import NullTracker, Tracker, mlflow_run
from stages.train_gcn import TrainParams


@dataclass(frozen=True)
class FinetuneVideoParams:
    """The ``finetune_video`` section of params.yaml."""

    recipe: training.Recipe
    true_skeletons: bool = True  # also train on the same videos' .skeleton joints
    rotation: float = 0.0  # random rotation per axis, radians (the loader's augmentation; 0: off)
    eval_batch_size: int = 64
    seed: int = 1
    threads: int = 0  # CPU threads (0 = one per core)
    device: str = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"

    def validate(self) -> None:
        self.recipe.validate()
        if self.rotation < 0 or self.eval_batch_size < 1 or self.threads < 0:
            raise ParamsError(
                "params.yaml [finetune_video]: rotation >= 0, eval_batch_size >= 1, threads >= 0"
            )
        if self.recipe.ema_decay:
            raise ParamsError("params.yaml [finetune_video] recipe.ema_decay: not used here, leave it 0")


def training_samples(
    skeletons: dict, class_ids: list[int], true_skeletons: bool, view_align: bool
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Normalised samples ``(3, T, 25, 2)``, their class indices and whether each is estimated.

    Samples of actions the model does not know are skipped (a corpus of more classes than the model's
    benchmark)."""
    index = {int(c): i for i, c in enumerate(class_ids)}
    xs, ys, estimated = [], [], []
    sources = video_skeletons.SOURCES if true_skeletons else ("estimated",)
    for source in sources:
        data = skeletons[source]
        for joints, action in zip(data["joints"], data["actions"].tolist(), strict=True):
            if int(action) not in index:
                continue
            xs.append(normalise(joints[None], view_align)[0].astype(np.float32))
            ys.append(index[int(action)])
            estimated.append(source == "estimated")
    return xs, np.asarray(ys, dtype=np.int64), np.asarray(estimated, dtype=bool)


def batch(
    xs: list[np.ndarray], idx: np.ndarray, loader: LoaderParams, rotation: float, seed: int, epoch: int
) -> torch.Tensor:
    """One training batch ``(B, 3, window, 25, 2)``: each sample's random crop and resize, deterministic
    for ``(seed, epoch, sample)``."""
    clips = []
    for i in idx.tolist():
        rng = np.random.default_rng([seed, epoch, i])
        clip = sample_clips(xs[i], loader, True, rng)[0]
        if rotation > 0:
            clip = sampling.random_rotation(clip, rotation, rng)
        clips.append(clip)
    return torch.from_numpy(np.ascontiguousarray(np.stack(clips), dtype=np.float32))


def stream_losses(
    model, x: torch.Tensor, y: torch.Tensor, rt: training.Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the streams' cross-entropies and the fused scores (for the running accuracy)."""
    with rt.autocast():
        scores, feats = model.per_stream(x)
    scores = scores.float()
    loss = sum(nn.functional.cross_entropy(s, y) for s in scores)
    with torch.no_grad():
        fused = model.fuse(scores, feats.float())
    return loss, fused


def refit_fusion(
    model, xs: list[np.ndarray], ys: np.ndarray, loader: LoaderParams, rt, batch_size: int
) -> None:
    """Fit a learned fusion head (``concat``, ``attention``) again on the training samples' centre
    clips through the fine-tuned streams, as ``evaluate`` fits it on the train split."""
    scores, feats = [], []
    with torch.inference_mode():
        for start in range(0, len(xs), batch_size):
            clips = [sample_clips(x, loader, False)[0] for x in xs[start : start + batch_size]]
            x = torch.from_numpy(np.ascontiguousarray(np.stack(clips), dtype=np.float32)).to(rt.device)
            with rt.autocast():
                s, f = model.per_stream(x)
            scores.append(s.float().cpu())
            feats.append(f.float().cpu())
    device = next(model.parameters()).device
    fit_fusion_head(model.cpu(), torch.cat(scores, 1), torch.cat(feats), torch.from_numpy(ys))
    model.to(device).eval()


@torch.inference_mode()
def skeleton_test_top1(
    model, features_dir: Path, benchmark: str, loader: LoaderParams, rt, batch_size: int
) -> float:
    """The fused model's centre-clip top-1 on the benchmark's ``.skeleton`` test split (as ``evaluate``)."""
    ds = SkeletonDataset(
        features_dir, stream="joint", benchmark=benchmark, split="test", params=loader, train=False
    )
    batches = make_loader(ds, batch_size, shuffle=False, num_workers=0, pin_memory=rt.device.type == "cuda")
    scores, labels = training.predict(model, batches, rt)
    return training.topk_accuracy(scores, labels, 1)


def run(
    params: FinetuneVideoParams,
    loader: LoaderParams,
    features_params: FeaturesParams,
    *,
    model_path: Path,
    skeletons_dir: Path,
    features_dir: Path,
    out_dir: Path,
    reports_dir: Path,
    tracker: Tracker | None = None,
) -> dict:
    """Fine-tune and write ``model.pt`` and the reports; returns the metrics."""
    tracker = tracker or NullTracker()
    torch.manual_seed(params.seed)
    rt = training.setup_runtime(params.device, params.amp, "off")
    if params.threads and rt.device.type == "cpu":
        torch.set_num_threads(params.threads)
    model, meta = load_fused(Path(model_path))
    model = model.to(rt.device)
    data = video_skeletons.load(Path(skeletons_dir))
    xs, ys, estimated = training_samples(
        data, list(meta["class_ids"]), params.true_skeletons, features_params.view_align
    )
    if not xs:
        raise ValueError(f"{skeletons_dir}: no sample of the model's {len(meta['class_ids'])} classes")
    if not estimated.any():  # e.g. an estimator that finds nobody: the run says so, the DAG goes on
        print(f"finetune_video: warning: {skeletons_dir} has no estimated skeleton of the model's classes")
    recipe = params.recipe
    steps_per_epoch = max(1, -(-len(xs) // recipe.batch_size))
    optimizer = training.build_optimizer(model, recipe, rt)
    rng = np.random.default_rng(params.seed)
    history, step, started = [], 0, time.perf_counter()
    tracker.log_params(
        {"finetune_video": dataclasses.asdict(params), "samples": len(xs), "estimated": int(estimated.sum())}
    )
    for epoch in range(recipe.epochs):
        model.train()
        order = rng.permutation(len(xs))
        totals = np.zeros(4)  # loss sum, correct, correct on estimated, estimated count
        epoch_start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = batch(xs, idx, loader, params.rotation, params.seed, epoch).to(rt.device)
            y = torch.from_numpy(ys[idx]).to(rt.device)
            for group in optimizer.param_groups:
                group["lr"] = training.lr_at(recipe, step, steps_per_epoch)
            loss, fused = stream_losses(model, x, y, rt)
            training.optimizer_step(loss, model, optimizer, None, step)
            step += 1
            hit = (fused.argmax(1) == y).cpu().numpy()
            totals += [loss.item() * len(idx), hit.sum(), hit[estimated[idx]].sum(), estimated[idx].sum()]
        row = {
            "epoch": epoch + 1,
            "loss": round(totals[0] / len(xs), 5),
            "train_top1": round(totals[1] / len(xs), 5),
            "train_top1_estimated": round(totals[2] / max(totals[3], 1), 5),
            "lr": round(optimizer.param_groups[0]["lr"], 7),
            "seconds": round(time.perf_counter() - epoch_start, 1),
        }
        history.append(row)
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        print(
            f"finetune_video epoch {epoch + 1}/{recipe.epochs}: loss {row['loss']:.4f} train top-1 "
            f"{row['train_top1']:.4f} (estimated {row['train_top1_estimated']:.4f}) {row['seconds']:.0f} s",
            flush=True,
        )
    model.eval()
    if model.head is not None:  # a learned fusion: refitted on the fine-tuned streams' outputs
        refit_fusion(model, xs, ys, loader, rt, params.eval_batch_size)
    test_top1 = skeleton_test_top1(
        model, Path(features_dir), meta["benchmark"], loader, rt, params.eval_batch_size
    )
    before = meta.get("metrics", {}).get("centre_clip", {}).get("fused", {}).get("top1")
    metrics = {
        "benchmark": meta["benchmark"],
        "samples": len(xs),
        "estimated_samples": int(estimated.sum()),
        "epochs": recipe.epochs,
        "train_top1_estimated": history[-1]["train_top1_estimated"] if history else None,
        "skeleton_test_top1": round(test_top1, 5),
        "skeleton_test_top1_before": before,
        # the keys evaluate's model.pt carries, so the bundle's metrics read alike
        "centre_clip": {"fused": {"top1": round(test_top1, 5)}},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **meta,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "metrics": json.loads(json.dumps({k: v for k, v in metrics.items() if k != "seconds"})),
        "finetuned_on": "video_skeletons",
    }
    torch.save(record, out_dir / "model.pt")
    with (reports_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)
    write_metrics(reports_dir / "metrics.json", metrics)
    tracker.log_metrics({"skeleton_test_top1": metrics["skeleton_test_top1"]})
    for name in ("metrics.json", "history.csv"):
        tracker.log_artifact(reports_dir / name, "finetune_video")
    print(
        f"finetune_video: {len(xs)} samples ({metrics['estimated_samples']} estimated), "
        f".skeleton test top-1 {test_top1:.4f} (before: {before}), {metrics['seconds']:.0f} s"
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--model", required=True, type=Path, help="evaluate's model.pt")
    ap.add_argument("--skeletons", required=True, type=Path, help="the video_skeletons stage's output")
    ap.add_argument("--features-dir", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--reports-dir", required=True, type=Path)
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "finetune_video", FinetuneVideoParams)
        loader = load_section(args.params, "loader", LoaderParams)
        features_params = load_section(args.params, "features", FeaturesParams)
        kwargs = dict(
            model_path=args.model,
            skeletons_dir=args.skeletons,
            features_dir=args.features_dir,
            out_dir=args.out_dir,
            reports_dir=args.reports_dir,
        )
        if args.no_mlflow:
            run(params, loader, features_params, **kwargs)
        else:
            benchmark = load_section(args.params, "train", TrainParams).benchmark
            with mlflow_run(benchmark, "finetune_video", "finetune_video") as tracker:
                run(params, loader, features_params, tracker=tracker, **kwargs)
    except (ParamsError, ExportError, ValueError, FileNotFoundError) as exc:
        print(f"finetune_video: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
