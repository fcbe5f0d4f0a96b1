"""Stage ``evaluate``: per-stream and fused accuracy of the trained streams on the benchmark's test split.

Builds the multi-stream model (:class:`models.two_stream.MultiStream`) from each stream's checkpoint
and runs it on the test split's joints, deriving bones/motion inside the model exactly as the
exported graph and the server do. Reports top-1/top-5 per stream and fused, for the centre clip and
(``multi_clips`` > 0) for N uniform clips averaged (pyskl's and TAO's test mode), the accuracy of each
class and of the listed class pairs (sit down vs stand up: only motion direction tells them apart),
the confusion matrix and the most-confused pairs. Learned fusions (``concat``, ``attention``) are
fitted first on the train split's features with the streams frozen.

Outputs in ``--out-dir``: ``metrics.json`` (DVC metrics), ``per_class.csv``, ``confusion.csv``
(DVC confusion plot), ``confusion.png``, ``confused_pairs.json`` and ``model.pt`` (the fused model
with its configs, classes and input spec, for export).

    python -m stages.evaluate --features-dir data/features --checkpoints-dir data/checkpoints \\
        --out-dir data/evaluate
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.ctrgcn import CTRGCNConfig
from models.features import STREAMS
from models.two_stream import FUSIONS, MultiStream, fit_fusion_head
from stages import training
from stages.dataset import LoaderParams, SkeletonDataset, make_loader
from stages.params import ParamsError, load_section
from stages.store import atomic_file, open_store, write_metrics
from stages.tracking import NullTracker, Tracker, mlflow_run
from stages.train_gcn import TrainParams


@dataclass(frozen=True)
class EvaluateParams:
    """The ``evaluate`` section of params.yaml."""

    fusion: Literal["sum", "concat", "attention"] = "sum"
    # score-sum weights per stream (only the trained streams' are used); CTR-GCN's 4-stream values
    fusion_weights: dict[str, float] = field(
        default_factory=lambda: {"joint": 0.6, "bone": 0.6, "joint_motion": 0.4, "bone_motion": 0.4}
    )
    checkpoint: Literal["last", "best"] = "last"  # best = selected on the test split (research habit)
    multi_clips: int = 0  # N uniform clips averaged, besides the centre clip (0: off; pyskl uses 10)
    batch_size: int = 64
    workers: int = 1
    pairs: tuple[tuple[int, ...], ...] = ((8, 9),)  # NTU action ids whose joint accuracy is reported
    top_confused: int = 10

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise ParamsError(f"params.yaml [evaluate] fusion: valid {', '.join(FUSIONS)}")
        bad = [s for s in self.fusion_weights if s not in STREAMS]
        if bad:
            raise ParamsError(f"params.yaml [evaluate] fusion_weights: unknown stream(s) {bad}")
        bad = {s: w for s, w in self.fusion_weights.items() if not (np.isfinite(w) and w >= 0)}
        if bad:
            raise ParamsError(
                f"params.yaml [evaluate] fusion_weights: finite and >= 0 are required, got {bad}"
            )
        if self.multi_clips < 0 or self.batch_size < 1 or any(len(p) != 2 for p in self.pairs):
            raise ParamsError("params.yaml [evaluate]: multi_clips >= 0, batch_size >= 1, pairs of 2 ids")

    def check_streams(self, streams: tuple[str, ...]) -> None:
        """The score sum needs a weight for every trained stream (a missing one used to count as 1.0)
        and a positive one among them."""
        if self.fusion != "sum":
            return
        missing = [s for s in streams if s not in self.fusion_weights]
        if missing:
            raise ParamsError(
                f"params.yaml [evaluate] fusion_weights: no weight for the trained stream(s) {missing}"
            )
        if not any(self.fusion_weights[s] > 0 for s in streams):
            raise ParamsError(
                f"params.yaml [evaluate] fusion_weights: all zero for the streams {list(streams)}"
            )


def load_streams(checkpoints_dir: Path, streams: tuple[str, ...], which: str) -> dict[str, dict]:
    """Each stream's checkpoint ``<dir>/<stream>/<which>.pt``; they must agree on classes and benchmark."""
    ckpts = {}
    for name in streams:
        path = checkpoints_dir / name / f"{which}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: train the {name!r} stream first (dvc repro train_gcn)")
        ckpts[name] = training.load_checkpoint(path)
    first = next(iter(ckpts.values()))
    for name, ck in ckpts.items():
        if ck["class_names"] != first["class_names"] or ck["benchmark"] != first["benchmark"]:
            raise ValueError(f"stream {name!r} was trained on other classes or another benchmark")
    return ckpts


def build_model(ckpts: dict[str, dict], fusion: str, weights: dict[str, float]) -> MultiStream:
    """The multi-stream model with each stream's evaluation weights loaded (frozen, eval mode)."""
    configs = {name: CTRGCNConfig.from_dict(ck["config"]) for name, ck in ckpts.items()}
    model = MultiStream(configs, fusion=fusion, weights=weights)
    for name, ck in ckpts.items():
        model.streams[name].load_state_dict(training.eval_state_dict(ck))
    return model.eval()


@torch.inference_mode()
def stream_outputs(
    model: MultiStream, loader, rt: training.Runtime, per_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Per-stream scores ``(S, N, K)`` and features ``(N, F)`` over ``loader``; multi-clip batches
    ``(N, clips, ...)`` are averaged as probabilities (returned as log-probabilities) and features,
    or with ``per_clip`` returned clip by clip, ``(S, N * clips, K)`` and ``(N * clips, F)``."""
    model.eval()
    scores, feats, labels = [], [], []
    for x, y in loader:
        x = x.to(rt.device)
        clips = x.shape[1] if x.dim() == 6 else 0
        with rt.autocast():
            s, f = model.per_stream(x.flatten(0, 1) if clips else x)
        s, f = s.float(), f.float()
        if clips and not per_clip:
            s = training.average_clips(s, clips)  # S, N, K
            f = f.view(-1, clips, f.shape[-1]).mean(1)
        scores.append(s.cpu())
        feats.append(f.cpu())
        labels.append(y)
    return torch.cat(scores, 1), torch.cat(feats), torch.cat(labels).numpy()


@torch.no_grad()
def fuse_clips(
    model: MultiStream, scores: torch.Tensor, feats: torch.Tensor, clips: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip stream scores ``(S, N * clips, K)`` and features -> the fused scores ``(N, K)`` as the
    server combines a sample's clips (each clip fused, the clips' probabilities averaged, returned
    as log-probabilities; one clip: the fused scores), and each stream's scores ``(S, N, K)``."""
    fused = model.fuse(scores, feats)
    if clips > 1:
        return training.average_clips(fused, clips), training.average_clips(scores, clips)
    return fused, scores


def fused_record(
    model: MultiStream,
    class_names: list[str],
    class_ids: list[int],
    benchmark: str,
    loader_params: LoaderParams,
    metrics: dict,
) -> dict:
    """What ``model.pt`` holds: the fused model's weights, configs, classes and input spec (tensors and
    plain values only, so it loads with ``weights_only=True``; :func:`stages.export.load_fused`)."""
    return {
        "kind": "multistream",
        "streams": list(model.names),
        "configs": {n: model.streams[n].cfg.to_dict() for n in model.names},
        "fusion": model.fusion,
        "weights": {n: round(float(w), 6) for n, w in zip(model.names, model.weights.tolist(), strict=True)},
        "state_dict": model.state_dict(),
        "class_names": list(class_names),
        "class_ids": [int(c) for c in class_ids],
        "benchmark": benchmark,
        "loader": dataclasses.asdict(loader_params),
        "input": {"layout": "N, C=3, T, V=25, M", "window": loader_params.window, "units": "metres, centred"},
        "metrics": json.loads(json.dumps(metrics)),
    }


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted."""
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def most_confused(cm: np.ndarray, names: list[str], top: int) -> list[dict]:
    """The ``top`` largest off-diagonal cells: true class, predicted class, count, share of the class."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:top]
    out = []
    for flat in order:
        t, p = divmod(int(flat), cm.shape[0])
        if off[t, p] == 0:
            break
        out.append(
            {
                "true": names[t],
                "predicted": names[p],
                "count": int(off[t, p]),
                "share": round(off[t, p] / cm[t].sum(), 4),
            }
        )
    return out


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    size = max(6.0, 0.35 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        labels = [n[:28] for n in names]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy(scores: torch.Tensor | np.ndarray, labels: np.ndarray) -> dict[str, float]:
    s = scores.numpy() if isinstance(scores, torch.Tensor) else scores
    return {
        "top1": round(training.topk_accuracy(s, labels, 1), 5),
        "top5": round(training.topk_accuracy(s, labels, 5), 5),
    }


def run(
    params: EvaluateParams,
    train_params: TrainParams,
    loader_params: LoaderParams,
    *,
    features_dir: Path,
    checkpoints_dir: Path,
    out_dir: Path,
    tracker: Tracker | None = None,
) -> dict:
    """Evaluate and write the reports; returns the metrics."""
    tracker = tracker or NullTracker()
    params.check_streams(tuple(train_params.streams))
    rt = training.setup_runtime(train_params.device, train_params.amp, "off")
    ckpts = load_streams(checkpoints_dir, train_params.streams, params.checkpoint)
    model = build_model(ckpts, params.fusion, params.fusion_weights).to(rt.device)
    first = next(iter(ckpts.values()))
    benchmark, names = first["benchmark"], list(first["class_names"])
    store_attrs = open_store(features_dir / "features.zarr", required=()).attrs
    class_ids = [int(c) for c in store_attrs["class_ids"]]
    denoise = store_attrs.get("denoise")  # the parse stage's mode when not the default

    def loader(split: str, lp: LoaderParams):
        ds = SkeletonDataset(
            features_dir, stream="joint", benchmark=benchmark, split=split, params=lp, train=False
        )
        if len(ds) == 0:
            raise ValueError(
                f"{features_dir}: the {split} split of {benchmark} is empty: nothing to evaluate"
            )
        pin = rt.device.type == "cuda"
        return make_loader(ds, params.batch_size, shuffle=False, num_workers=params.workers, pin_memory=pin)

    # The model's own figures fuse the way the server does: each clip's streams fused, then the
    # clips' probabilities averaged (one clip: the fused scores); each stream's clips are averaged
    # for its own figure. (The multi_clips report below fuses pyskl's way: each stream's clips
    # averaged first, then fused.) A learned fusion head is fitted on clips, as it is applied.
    clips = loader_params.test_clips if loader_params.sampling == "uniform" else 1
    fit_losses = []
    if params.fusion != "sum":
        train_scores, train_feats, train_labels = stream_outputs(
            model, loader("train", loader_params), rt, per_clip=True
        )
        train_labels = torch.from_numpy(np.repeat(train_labels, clips))
        fit_losses = fit_fusion_head(model.cpu(), train_scores, train_feats, train_labels)
        model = model.to(rt.device).eval()
    scores, feats, labels = stream_outputs(model, loader("test", loader_params), rt, per_clip=True)
    fused, scores = fuse_clips(model.cpu(), scores, feats, clips)
    metrics: dict = {"benchmark": benchmark, "fusion": params.fusion, "test_samples": len(labels)}
    metrics["centre_clip"] = {
        "fused": _accuracy(fused, labels),
        **{name: _accuracy(scores[i], labels) for i, name in enumerate(model.names)},
    }
    if params.multi_clips > 0:
        lp = dataclasses.replace(loader_params, sampling="uniform", test_clips=params.multi_clips)
        model = model.to(rt.device)
        m_scores, m_feats, m_labels = stream_outputs(model, loader("test", lp), rt)
        with torch.no_grad():
            m_fused = model.cpu().fuse(m_scores, m_feats)
        metrics[f"uniform_{params.multi_clips}_clips"] = {
            "fused": _accuracy(m_fused, m_labels),
            **{name: _accuracy(m_scores[i], m_labels) for i, name in enumerate(model.names)},
        }

    pred = fused.argmax(1).numpy()
    k = len(names)
    cm = confusion_matrix(pred, labels, k)
    per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
    metrics["mean_class_top1"] = round(float(per_class[cm.sum(1) > 0].mean()), 5)
    metrics["pairs"] = {}
    for a, b in params.pairs:
        if a in class_ids and b in class_ids:
            members = np.isin(labels, [class_ids.index(a), class_ids.index(b)])
            if members.any():  # a pair with no test sample has no accuracy (NaN is not JSON)
                metrics["pairs"][f"A{a:03d}_A{b:03d}"] = round(
                    float(np.mean(pred[members] == labels[members])), 5
                )
    confused = most_confused(cm, names, params.top_confused)

    # every file written whole or not at all (a temporary file, then a rename)
    with atomic_file(out_dir / "per_class.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_id", "class", "test_samples", "top1"])
        for i in range(k):
            top1 = round(float(per_class[i]), 5) if cm[i].sum() else ""  # no test sample: no accuracy
            w.writerow([f"A{class_ids[i]:03d}", names[i], int(cm[i].sum()), top1])
    with atomic_file(out_dir / "confusion.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((names[t], names[p]) for t, p in zip(labels.tolist(), pred.tolist(), strict=True))
    with atomic_file(out_dir / "confused_pairs.json") as tmp:
        tmp.write_text(json.dumps(confused, indent=2) + "\n")
    fused_top1 = metrics["centre_clip"]["fused"]["top1"]
    title = f"{benchmark} test, {'+'.join(model.names)} ({params.fusion}): top-1 {fused_top1:.3f}"
    with atomic_file(out_dir / "confusion.png") as tmp:
        plot_confusion(cm, names, tmp, title)
    record = fused_record(model, names, class_ids, benchmark, loader_params, metrics)
    with atomic_file(out_dir / "model.pt") as tmp:
        torch.save({**record, "denoise": denoise} if denoise else record, tmp)
    write_metrics(out_dir / "metrics.json", metrics)

    tracker.log_params({"evaluate": dataclasses.asdict(params), "streams": list(model.names)})
    flat = {
        f"{clip}.{stream}.{k_}": v
        for clip, d in metrics.items()
        if isinstance(d, dict) and clip != "pairs"
        for stream, acc in d.items()
        for k_, v in acc.items()
    }
    tracker.log_metrics(
        {
            **flat,
            **{f"pair.{p}": v for p, v in metrics["pairs"].items()},
            "mean_class_top1": metrics["mean_class_top1"],
        }
    )
    for name in ("metrics.json", "per_class.csv", "confusion.png", "confused_pairs.json"):
        tracker.log_artifact(out_dir / name, "evaluate")
    if fit_losses:
        tracker.log_metrics({"fusion_fit_loss": fit_losses[-1]})
    c = metrics["centre_clip"]
    print(
        f"evaluate {benchmark}: fused top-1 {c['fused']['top1']:.4f} / top-5 {c['fused']['top5']:.4f} "
        + " ".join(f"{n} {c[n]['top1']:.4f}" for n in model.names)
        + "".join(f", {p} {v:.4f}" for p, v in metrics["pairs"].items())
    )
    for row in confused[:5]:
        print(f"  confused: {row['true']} -> {row['predicted']}: {row['count']} ({row['share']:.1%})")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--features-dir", required=True, type=Path)
    ap.add_argument("--checkpoints-dir", required=True, type=Path, help="holds <stream>/last.pt and best.pt")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "evaluate", EvaluateParams)
        train_params = load_section(args.params, "train", TrainParams)
        loader_params = load_section(args.params, "loader", LoaderParams)
        kwargs = dict(
            features_dir=args.features_dir, checkpoints_dir=args.checkpoints_dir, out_dir=args.out_dir
        )
        if args.no_mlflow:
            run(params, train_params, loader_params, **kwargs)
        else:
            with mlflow_run(train_params.benchmark, "evaluate", "evaluate") as tracker:
                run(params, train_params, loader_params, tracker=tracker, **kwargs)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
