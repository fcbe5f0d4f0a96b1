"""Batch-1 inference latency of the fused model: PyTorch eager, ONNX Runtime fp32 and INT8, and the
one-person graph the server runs for clips without a second person.

One one-person clip ``(B=1, C=3, T=64, V=25, M=2)``, second person zeros, the same ``--threads``
for every runtime, all measured in this run: ``--rounds`` rounds, the runtimes in alternating order,
``--runs`` timed calls each; the median per runtime and its speed-up over PyTorch eager are printed.

- default: the trained default model (``data/evaluate/model.pt``) and its bundle
  (``data/export/bundle``: ``model.onnx``, ``model.int8.onnx``, ``model.solo.onnx``), as ``dvc repro``
  made them;
- ``--size full`` (or ``small``): an untrained two-stream model of the published CTR-GCN size (or
  the small CPU config), exported and quantised here (calibrated on random clips: right for timing,
  not for accuracy).

    python -m benchmarks.inference_latency [--size full|small] [--threads 2] [--rounds 5] [--runs 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from models.ctrgcn import config_for
    from models.inference import InferenceMultiStream
    from models.two_stream import MultiStream
    from stages import export, training

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("default", "full", "small"), default="default")
    ap.add_argument("--model", type=Path, default=Path("data/evaluate/model.pt"))
    ap.add_argument("--bundle", type=Path, default=Path("data/export/bundle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--frames", type=int, default=64)
    args = ap.parse_args(argv)

    if args.threads < 1 or args.rounds < 1 or args.runs < 1:
        ap.error("--threads, --rounds and --runs must be >= 1")
    if args.size == "default":
        missing = [p for p in (args.model, args.bundle / "model.onnx") if not p.is_file()]
        if missing:
            print(
                f"inference_latency: {' and '.join(map(str, missing))} missing: run `make run` first "
                "(or --size full / small for an untrained model exported here)",
                file=sys.stderr,
            )
            return 2
    torch.set_num_threads(args.threads)
    training.keep_large_allocations()
    tmp = tempfile.TemporaryDirectory()
    if args.size == "default":
        try:
            model, _ = export.load_fused(args.model)
        except export.ExportError as exc:
            print(f"inference_latency: {exc}", file=sys.stderr)
            return 2
        fp32, int8 = args.bundle / "model.onnx", args.bundle / "model.int8.onnx"
        solo = args.bundle / "model.solo.onnx"
    else:
        torch.manual_seed(0)
        model = MultiStream({s: config_for(args.size, 120) for s in ("joint", "bone")}).eval()
        fp32, int8 = Path(tmp.name) / "m.onnx", Path(tmp.name) / "m.int8.onnx"
        export.export_onnx(InferenceMultiStream(model), fp32)  # as the export stage does
        calib = np.random.default_rng(0).normal(0, 0.3, size=(32, 3, 64, 25, 2)).astype(np.float32)
        export.quantize_int8(fp32, int8, calib)
        solo = Path(tmp.name) / "m.solo.onnx"
        export.export_onnx(InferenceMultiStream(model, args.frames), solo, frames=args.frames, persons=1)
    params = sum(p.numel() for p in model.parameters())
    x = np.zeros((1, 3, args.frames, 25, 2), dtype=np.float32)
    x[..., 0] = np.random.default_rng(1).normal(0, 0.3, size=(1, 3, args.frames, 25))
    runtimes = {"pytorch eager": lambda c: export.torch_scores(model, c)}
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8), ("ort fp32 one-person", solo)):
        if path.exists():
            session = export.ort_session(path, args.threads)
            fixed = session.get_inputs()[0].shape[2]  # T: a name if dynamic, a number if not
            if isinstance(fixed, int) and fixed != args.frames:
                print(f"{name}: {path} takes T={fixed} only, not {args.frames}: skipped", file=sys.stderr)
                continue
            persons = 1 if path == solo else 2  # the one-person graph takes person 1 only
            runtimes[name] = lambda c, s=session, m=persons: s.run(
                ["scores"], {"joints": np.ascontiguousarray(c[..., :m])}
            )
        else:
            print(f"{name}: {path} missing, skipped", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for r in range(args.rounds):
        for name in list(runtimes) if r % 2 == 0 else reversed(list(runtimes)):
            times[name] += export.call_times_ms(runtimes[name], x, args.runs, warmup=3)
    base = statistics.median(times["pytorch eager"])
    print(
        f"fused joint+bone CTR-GCN ({args.size}, {params / 1e6:.3f} M parameters), B=1 T={args.frames} M=2, "
        f"{args.threads} threads, median of {args.rounds} x {args.runs} calls"
    )
    print(f"{'runtime':<20} {'median ms':>10} {'p90 ms':>8} {'speed-up':>9}")
    for name, ts in times.items():
        med, p90 = statistics.median(ts), float(np.percentile(ts, 90))
        print(f"{name:<20} {med:>10.2f} {p90:>8.2f} {base / med:>8.2f}x")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
