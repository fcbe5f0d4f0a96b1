"""Stage ``train_pose``: train the HRNet-like pose estimator (keypoints + person centres) from scratch.

``python -m stages.train_pose --params params.yaml --pose-dir data/pose --out-dir data/pose_model
--reports-dir data/reports/pose [--resume] [--epochs N] [--no-mlflow]``

Each step takes a batch of augmented person crops (heatmap + coordinate + 3D loss,
:func:`models.pose.pose_loss`) and a batch of whole frames (CenterNet person-centre loss,
:func:`models.pose.detect_loss`) from the training performers of ``train_pose.benchmark``. After the
last epoch (and every ``eval_every``) the held-out performers' crops give PCK@0.2 and PCK@0.5
(torso-normalised), the mean 2D error in colour-frame pixels and the root-relative MPJPE (mm), and
their frames the person-detection recall and precision at IoU 0.5.

With ``other_person`` (default) each crop also carries the joint box of the other person labelled in
its frame (:func:`stages.pose_dataset.other_boxes`; moved with the crop's augmentation, jittered, and
hidden one time in ten as a detector miss would), which the keypoint network reads as a mask channel:
where two performers overlap, it says which body is not the target. Evaluation gives the held-out
crops their labelled peers' boxes, as the crops themselves are cut from labelled boxes.

The runtime is the action trainer's (:mod:`stages.training`): bf16 autocast, TF32, ``torch.compile``
and fused optimisers on CUDA; fp32 with one thread per core on CPU. ``last.pt`` is written atomically
every epoch with the model config, optimiser, EMA, RNG states and history, loads with
``weights_only=True``, and ``--resume`` continues it exactly. Metrics go to ``metrics.json`` (DVC
metrics), per-epoch rows to ``history.csv`` (DVC plots), and everything to MLflow.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.pose import (
    PoseConfig,
    PoseEstimator,
    PoseLossWeights,
    centre_targets,
    decode_people,
    detect_loss,
    flip_boxes,
    flip_heatmaps,
    flip_images,
    flip_location_maps,
    keypoint_outputs,
    normalise_images,
    pose_config_for,
    pose_loss,
    pose_targets,
)
from stages import training
from stages.ntu_files import BENCHMARKS
from stages.params import ParamsError, load_section
from stages.pose_dataset import AugmentParams, CropDataset, FrameDataset, PoseSplit, load_split
from stages.pose_metrics import detection_recall, pose_metrics
from stages.store import ContractError, write_metrics
from stages.tracking import NullTracker, Tracker, mlflow_run
from stages.training import Recipe

HISTORY_FIELDS = (
    "epoch",
    "lr",
    "loss",
    "keypoint_loss",
    "detect_loss",
    "crops_per_s",
    "seconds",
    "pck@0.2",
    "pck@0.5",
    "px_error",
    "mpjpe_mm",
    "det_recall",
)


@dataclass(frozen=True)
class TrainPoseParams:
    """The ``train_pose`` section of params.yaml."""

    recipe: Recipe
    augment: AugmentParams = dataclasses.field(default_factory=AugmentParams)
    loss: PoseLossWeights = dataclasses.field(default_factory=PoseLossWeights)
    sigma: float = 2.0  # heatmap targets' std, heatmap pixels (1/4 of the crop's)
    model: Literal["small", "full"] = "small"
    other_person: bool = True  # the keypoint network also reads the other person's box (PoseConfig)
    benchmark: str = "ntu120_xsub"  # its test half (held-out performers) is the evaluation set
    frame_batch_size: int = 8  # detector frames per step, beside recipe.batch_size crops
    max_train_crops: int = 0  # 0 = all
    max_test_crops: int = 2000  # evaluation subset (seeded); 0 = all
    flip_test: bool = True  # average each test crop's maps with its mirror's
    eval_every: int = 0  # 0 = only after the last epoch
    seed: int = 1
    workers: int = 1  # loader processes
    threads: int = 0  # CPU threads for the model (0 = one per core)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ParamsError(
                f"params.yaml [train_pose] benchmark {self.benchmark!r}; valid: {', '.join(BENCHMARKS)}"
            )
        if self.frame_batch_size < 1 or min(self.workers, self.eval_every, self.threads) < 0:
            raise ParamsError(
                "params.yaml [train_pose]: frame_batch_size >= 1; workers, threads, eval_every >= 0"
            )
        if self.sigma <= 0 or min(dataclasses.astuple(self.loss)) < 0:
            raise ParamsError("params.yaml [train_pose]: sigma > 0 and loss weights >= 0")


def _cycle(loader: DataLoader) -> Iterator:
    """The loader's batches, again and again (the frames run out before the crops do, or after)."""
    while True:
        yield from loader


def _float(out):
    return type(out)(*(t.float() for t in out))


def boxes_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` x0 y0 x1 y1 -> cx cy w h (all-zero boxes stay zero)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def train_step_losses(
    model: PoseEstimator,
    detect,
    crops,
    frames,
    cfg: PoseConfig,
    rt: training.Runtime,
    weights: PoseLossWeights,
):
    """The keypoint and detection losses of one step (``detect``: the maybe-compiled ``model.detect``)."""
    images, uv, xyz, vis, other = (t.to(rt.device, non_blocking=True) for t in crops)
    frame_images, boxes = (t.to(rt.device, non_blocking=True) for t in frames)
    x, fx = normalise_images(images), normalise_images(frame_images)
    with rt.autocast():
        out = model(x, other)
        det = detect(fx)
    out, det = _float(out), _float(det)
    kp = pose_loss(out, pose_targets(uv, vis, cfg, xyz, input_size=tuple(x.shape[2:])), weights)
    targets = centre_targets(boxes_xyxy_to_cxcywh(boxes), tuple(det.centre.shape[2:]))
    dl = detect_loss(det, targets)
    return kp["total"], dl["total"]


def train_one_epoch(
    model,
    detect,
    crop_loader,
    frame_iter,
    optimizer,
    *,
    recipe,
    rt,
    cfg,
    step,
    steps_per_epoch,
    ema,
    desc,
    loss_weights: PoseLossWeights,
) -> tuple[dict, int]:
    model.train()
    totals = np.zeros(4)  # keypoint loss sum, detect loss sum, batches, crops
    start = time.perf_counter()
    bar = tqdm(crop_loader, desc=desc, leave=False, disable=not training.show_progress(rt), unit="batch")
    for crops in bar:
        for group in optimizer.param_groups:
            group["lr"] = training.lr_at(recipe, step, steps_per_epoch)
        kp, dl = train_step_losses(model, detect, crops, next(frame_iter), cfg, rt, loss_weights)
        loss = kp + dl
        training.optimizer_step(loss, model, optimizer, ema, step, what="pose loss")
        step += 1
        totals += [kp.item(), dl.item(), 1, len(crops[0])]
        bar.set_postfix(
            loss=f"{(totals[0] + totals[1]) / totals[2]:.3f}",
            crops_s=f"{totals[3] / (time.perf_counter() - start):.1f}",
        )
    seconds = time.perf_counter() - start
    totals = [float(t) for t in totals]  # plain floats: checkpoints load with weights_only=True
    batches = max(totals[2], 1)
    return {
        "keypoint_loss": round(totals[0] / batches, 5),
        "detect_loss": round(totals[1] / batches, 5),
        "loss": round((totals[0] + totals[1]) / batches, 5),
        "crops_per_s": round(totals[3] / seconds, 2),
        "seconds": round(seconds, 2),
    }, step


@torch.no_grad()
def predict_crops(
    model: PoseEstimator,
    images: np.ndarray,
    rt: training.Runtime,
    flip_test: bool,
    batch_size: int = 64,
    other: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 BGR crops ``(N, S, S, 3)`` -> 2D joints ``(N, 25, 2)`` (crop px), 3D ``(N, 25, 3)`` (m) and
    confidence ``(N, 25)``; with ``flip_test`` the maps are averaged with the mirrored crop's.
    ``other`` ``(N, 4)``: the other person's box per crop (crop px, NaN: alone), for models that read it."""
    model.eval()
    if other is None:
        other = np.full((len(images), 4), np.nan, np.float32)
    out2d, out3d, conf = [], [], []
    for i in range(0, len(images), batch_size):
        x = normalise_images(torch.from_numpy(images[i : i + batch_size]).to(rt.device))
        boxes = torch.from_numpy(np.asarray(other[i : i + batch_size], np.float32)).to(rt.device)
        with rt.autocast():
            out = _float(model(x, boxes))
            if flip_test:
                mirrored = _float(model(flip_images(x), flip_boxes(boxes, x.shape[-1])))
                heat = (out.heatmaps + flip_heatmaps(mirrored.heatmaps)) / 2
                maps = (out.location_maps + flip_location_maps(mirrored.location_maps)) / 2
                out = keypoint_outputs(heat, maps, model.cfg.beta)
        out2d.append(out.coords2d.cpu().numpy())
        out3d.append(out.joints3d.cpu().numpy())
        conf.append(out.confidence.cpu().numpy())
    if not out2d:
        return np.zeros((0, 25, 2)), np.zeros((0, 25, 3)), np.zeros((0, 25))
    return np.concatenate(out2d), np.concatenate(out3d), np.concatenate(conf)


@torch.no_grad()
def detect_people(
    model: PoseEstimator, frames: np.ndarray, rt: training.Runtime, threshold: float, batch_size: int = 32
) -> list[np.ndarray]:
    """uint8 BGR frames ``(F, H, W, 3)`` -> per frame the person boxes ``(K, 4)`` x0 y0 x1 y1 (K <= 2)."""
    model.eval()
    found = []
    for i in range(0, len(frames), batch_size):
        x = normalise_images(torch.from_numpy(frames[i : i + batch_size]).to(rt.device))
        with rt.autocast():
            det = _float(model.detect(x))
        people = decode_people(det.centre, det.size, det.offset, max_people=2, threshold=threshold)
        for boxes, valid in zip(people.boxes.cpu().numpy(), people.valid.cpu().numpy(), strict=True):
            b = boxes[valid]
            found.append(
                np.stack(
                    [
                        b[:, 0] - b[:, 2] / 2,
                        b[:, 1] - b[:, 3] / 2,
                        b[:, 0] + b[:, 2] / 2,
                        b[:, 1] + b[:, 3] / 2,
                    ],
                    axis=1,
                )
            )
    return found


def evaluate(
    model: PoseEstimator, split: PoseSplit, rt: training.Runtime, flip_test: bool, threshold: float = 0.3
) -> dict:
    """Held-out metrics: :func:`stages.pose_metrics.pose_metrics` on the crops, detection on the frames."""
    pred2d, pred3d, _ = predict_crops(model, split.crops, rt, flip_test, other=split.other_box)
    size = split.crops.shape[1]
    # colour-frame pixels per crop pixel: crop side (video px) / crop size / (video px per colour px)
    pixel_scale = split.crop_box[:, 2] / size / split.video_scale
    metrics = pose_metrics(pred2d, split.joints2d, split.visible, pred3d, split.joints3d, pixel_scale)
    metrics.update(detection_recall(detect_people(model, split.frames, rt, threshold), split.frame_boxes))
    return {k: round(float(v), 5) if isinstance(v, float) else v for k, v in metrics.items()}


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in HISTORY_FIELDS} for row in history)
    tmp.replace(path)


def run(
    params: TrainPoseParams,
    *,
    pose_dir: Path,
    out_dir: Path,
    reports_dir: Path,
    resume: bool = False,
    tracker: Tracker | None = None,
) -> dict:
    """Train, evaluate and write the checkpoint and reports; returns the final metrics."""
    tracker = tracker or NullTracker()
    rt = training.setup_runtime(params.device, params.amp, params.compile)
    if params.threads and rt.device.type == "cpu":
        torch.set_num_threads(params.threads)
    recipe = params.recipe
    train = load_split(pose_dir, params.benchmark, "train", params.max_train_crops, params.seed)
    test = load_split(pose_dir, params.benchmark, "test", params.max_test_crops, params.seed)
    if len(train.crops) < recipe.batch_size or len(train.frames) < params.frame_batch_size:
        raise ContractError(
            f"{pose_dir}: {len(train.crops)} training crops and {len(train.frames)} frames "
            f"cannot fill one batch ({recipe.batch_size} / {params.frame_batch_size})"
        )
    size = train.crops.shape[1]
    cfg = pose_config_for(
        params.model, input_size=(size, size), sigma=params.sigma, other_person=params.other_person
    )
    resolved = {"train_pose": dataclasses.asdict(params), "model": cfg.to_dict(), "crops": len(train.crops)}
    run_id = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]

    torch.manual_seed(params.seed)
    model = PoseEstimator(cfg).to(rt.device)
    ema = training.build_ema(model, recipe.ema_decay)
    optimizer = training.build_optimizer(model, recipe, rt)
    start_epoch, step, history = 0, 0, []
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        ckpt = training.load_checkpoint(last_path)
        if ckpt.get("fingerprint") != run_id:
            raise ValueError(
                f"{last_path} comes from a run with other parameters; delete it or drop --resume"
            )
        model.load_state_dict(ckpt["model"])
        training.load_optimizer_state(optimizer, ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        training.set_rng_state(ckpt["rng"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        print(f"resuming train_pose from epoch {start_epoch} ({last_path})")

    crop_set = CropDataset(train, params.augment, params.seed)
    frame_set = FrameDataset(train, params.augment, params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    crop_loader = DataLoader(
        crop_set,
        recipe.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=params.workers,
        pin_memory=rt.device.type == "cuda",
    )
    frame_generator = torch.Generator()
    frame_loader = DataLoader(
        frame_set,
        params.frame_batch_size,
        shuffle=True,
        drop_last=True,
        generator=frame_generator,
        num_workers=0,
    )
    train_model, detect = model, model.detect
    if rt.compile:
        train_model, detect = torch.compile(model), torch.compile(model.detect)
    eval_model = ema.module if ema is not None else model
    num_params = sum(p.numel() for p in model.parameters())
    tracker.log_params({**resolved, "parameters": num_params})
    tracker.set_tags({"device": str(rt.device), "fingerprint": run_id})
    print(
        f"train_pose: {len(train.crops)} crops + {len(train.frames)} frames from training performers, "
        f"{params.model} estimator ({num_params:,} params), {recipe.epochs} epochs on {rt.device}"
        + (", bf16" if rt.amp_dtype else "")
        + (", compiled" if rt.compile else "")
    )
    steps_per_epoch = len(crop_loader)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, recipe.epochs):
        # every epoch's order and augmentation follow from (seed, epoch): a resumed run repeats them
        crop_set.epoch = frame_set.epoch = epoch
        generator.manual_seed(params.seed * 1000 + epoch)
        frame_generator.manual_seed(params.seed * 1000 + epoch + 500)
        frame_iter = _cycle(frame_loader)
        lr = training.lr_at(recipe, step, steps_per_epoch)
        stats, step = train_one_epoch(
            train_model,
            detect,
            crop_loader,
            frame_iter,
            optimizer,
            recipe=recipe,
            rt=rt,
            cfg=cfg,
            step=step,
            steps_per_epoch=steps_per_epoch,
            ema=ema,
            desc=f"pose {epoch + 1}/{recipe.epochs}",
            loss_weights=params.loss,
        )
        row = {"epoch": epoch + 1, "lr": lr, **stats}
        last = epoch + 1 == recipe.epochs
        if last or (params.eval_every and (epoch + 1) % params.eval_every == 0):
            row.update(evaluate(eval_model, test, rt, params.flip_test))
        history.append(row)
        training.save_checkpoint(
            last_path,
            {
                "kind": "pose_estimator",
                "config": cfg.to_dict(),
                "benchmark": params.benchmark,
                **training.resumable_state(
                    model, ema, optimizer, fingerprint=run_id, epoch=epoch + 1, step=step, history=history
                ),
            },
        )
        _write_history(reports_dir / "history.csv", history)
        tracker.log_metrics(
            {k: v for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}, step=epoch + 1
        )
        scores = f", PCK@0.2 {row['pck@0.2']:.4f}, MPJPE {row['mpjpe_mm']:.1f} mm" if "pck@0.2" in row else ""
        print(
            f"pose epoch {epoch + 1}/{recipe.epochs}: loss {stats['loss']:.4f} (keypoints "
            f"{stats['keypoint_loss']:.4f}, people {stats['detect_loss']:.4f}){scores}, "
            f"{stats['crops_per_s']:.1f} crops/s"
        )

    final = history[-1] if history else {}
    keys = ("pck@0.2", "pck@0.5", "px_error", "mpjpe_mm", "det_recall", "det_precision", "people", "frames")
    metrics = {
        **{k: final.get(k) for k in keys},
        "test_crops": len(test.crops),
        "train_crops": len(train.crops),
        "epochs": recipe.epochs,
        "parameters": num_params,
        "model": params.model,
        "crops_per_s": round(
            sum(h["crops_per_s"] * h["seconds"] for h in history)
            / max(sum(h["seconds"] for h in history), 1e-9),
            2,
        ),
        "train_seconds": round(sum(h["seconds"] for h in history), 1),
    }
    write_metrics(reports_dir / "metrics.json", metrics)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)})
    tracker.log_artifact(last_path, "checkpoints")
    tracker.log_artifact(reports_dir / "history.csv", "reports")
    resolved_path = out_dir / "config.yaml"
    resolved_path.write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=list)), sort_keys=False))
    tracker.log_artifact(resolved_path, "reports")
    return metrics


def load_estimator(path: Path, device: str = "cpu") -> PoseEstimator:
    """The evaluation weights (EMA when kept) of a ``train_pose`` checkpoint, in eval mode."""
    ckpt = training.load_checkpoint(path, map_location=device)
    if ckpt.get("kind") != "pose_estimator":
        raise ValueError(f"{path} is not a train_pose checkpoint (kind {ckpt.get('kind')!r})")
    model = PoseEstimator(PoseConfig.from_dict(ckpt["config"]))
    model.load_state_dict(training.eval_state_dict(ckpt))
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--pose-dir", required=True, type=Path, help="the pose_data stage's output")
    ap.add_argument("--out-dir", required=True, type=Path, help="checkpoint directory (last.pt)")
    ap.add_argument("--reports-dir", required=True, type=Path, help="metrics.json, history.csv")
    ap.add_argument("--resume", action="store_true", help="continue from --out-dir/last.pt")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (quick runs)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "train_pose", TrainPoseParams)
        if args.epochs is not None:
            params = dataclasses.replace(
                params, recipe=dataclasses.replace(params.recipe, epochs=args.epochs)
            )
        kwargs = dict(
            pose_dir=args.pose_dir, out_dir=args.out_dir, reports_dir=args.reports_dir, resume=args.resume
        )
        if args.no_mlflow:
            run(params, **kwargs)
        else:
            with mlflow_run(params.benchmark, "train_pose", "train_pose") as tracker:
                run(params, tracker=tracker, **kwargs)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"train_pose: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return training.interrupted("train_pose", args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
