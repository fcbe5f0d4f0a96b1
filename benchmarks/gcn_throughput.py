"""Training throughput and batch-1 latency: our CTR-GCN against the published implementation.

Same architecture and size (the full 1.46 M-parameter config unless ``--size small``), same input
``(B=16, C=3, T=64, V=25, M=2)``, same optimiser step (SGD Nesterov), ``--threads`` intra-op threads.
Each measurement runs in a fresh subprocess, alternating implementations over ``--rounds`` rounds,
and the median is reported with the ratio to the published code measured in the same run:

- ``published``: ``benchmarks/reference_ctrgcn_model.py`` (the research code), default allocator;
- ``published+malloc``: the same with our allocator setting (to show what that setting alone gives);
- ``ours``: ``models.ctrgcn`` with the training runtime's settings (``stages.training``);
- ``ours-onnx``: the same model (same weights) exported to ONNX as the export stage exports it
  (rebuilt for inference by :class:`models.inference.InferenceMultiStream`) and run by ONNX Runtime,
  the runtime the server uses: batch-1 latency only (no training column);
- ``ours-bf16``: ``ours`` under bf16 autocast (``train.amp: bf16``), an opt-in for CPUs with native
  bf16 (AVX512-BF16 / AMX); the header says whether this CPU has it (without it bf16 is emulated).

On CUDA (``--device cuda``) it compares fp32 eager against bf16 autocast + ``torch.compile`` of
``ours`` instead, both with the training runtime's CUDA settings (TF32, cudnn autotuning). The two
models compute the same function (``tests/test_ctrgcn.py``), so speed is the only difference.

    python -m benchmarks.gcn_throughput [--size full] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS_CPU = ("published", "published+malloc", "ours", "ours-onnx", "ours-bf16")
VARIANTS_CUDA = ("ours-fp32-eager", "ours-bf16-compile")


def onnx_latency(path: str, threads: int, steps: int, frames: int) -> dict:
    """Batch-1 latency (ms) of an exported model in ONNX Runtime, as :func:`measure` times eager."""
    import numpy as np

    from stages import export

    session = export.ort_session(path, threads)
    x = np.random.default_rng(0).normal(size=(1, 3, frames, 25, 2)).astype(np.float32)
    ms = export.batch1_latency_ms(lambda c: session.run(None, {export.INPUT: c}), x, steps * 3)
    return {"train_samples_per_s": float("nan"), "latency_ms": ms}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN uses it."""
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check()) or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def measure(variant: str, size: str, threads: int, steps: int, batch: int, frames: int, device: str) -> dict:
    """One measurement, in this process: training samples/s and batch-1 latency (ms)."""
    import torch

    from models.ctrgcn import CTRGCN, config_for
    from models.skeleton import adjacency_subsets
    from stages import training

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = config_for(size, 120)
    if variant.startswith("published"):
        from benchmarks.reference_ctrgcn_model import Model

        if variant == "published+malloc":
            training.keep_large_allocations()
        model = Model(adjacency_subsets(), num_class=120, channels=cfg.channels, strides=cfg.strides)
    else:
        if device == "cpu":
            training.keep_large_allocations()
        model = CTRGCN(cfg)
    dev = torch.device(device)
    model = model.to(dev)
    bf16 = variant in ("ours-bf16-compile", "ours-bf16")
    if device == "cuda":  # the training runtime's settings for every variant: the ratio is bf16 + compile
        training.enable_cuda_speedups()
    run_model = torch.compile(model) if variant == "ours-bf16-compile" else model
    fused = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-4, **fused
    )
    x = torch.randn(batch, 3, frames, 25, 2, device=dev)
    y = torch.randint(0, 120, (batch,), device=dev)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(run_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(2 if device == "cpu" else 10):  # warm-up (and compilation)
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_rate = steps * batch / (time.perf_counter() - start)

    model.eval()
    x1 = x[:1]
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            run_model(x1)
        sync()
        times = []
        for _ in range(steps * 3):
            t = time.perf_counter()
            run_model(x1)
            sync()
            times.append(time.perf_counter() - t)
    return {"train_samples_per_s": train_rate, "latency_ms": 1000 * statistics.median(times)}


class MeasurementFailed(RuntimeError):
    """A measurement subprocess exited with an error (the message holds the end of its stderr)."""


def run_one(variant: str, common: list[str]) -> dict:
    """One measurement of ``variant`` in a fresh interpreter: its JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gcn_throughput", "--one", variant, *common],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise MeasurementFailed(f"measuring {variant} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="full", choices=("full", "small"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant and print JSON
    ap.add_argument("--onnx", help=argparse.SUPPRESS)  # internal: the exported model of ours-onnx
    args = ap.parse_args(argv)
    if min(args.threads, args.rounds, args.steps, args.batch) < 1 or args.frames < 8:
        ap.error("--threads, --rounds, --steps and --batch must be >= 1, --frames >= 8")
    if args.one == "ours-onnx":
        print(json.dumps(onnx_latency(args.onnx, args.threads, args.steps, args.frames)))
        return 0
    if args.one:
        result = measure(args.one, args.size, args.threads, args.steps, args.batch, args.frames, args.device)
        print(json.dumps(result))
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gcn_throughput: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    variants = VARIANTS_CUDA if args.device == "cuda" else VARIANTS_CPU
    results: dict[str, list[dict]] = {v: [] for v in variants}
    common = ["--size", args.size, "--threads", str(args.threads), "--steps", str(args.steps),
              "--batch", str(args.batch), "--frames", str(args.frames), "--device", args.device]  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    if "ours-onnx" in variants:  # exported once: the model measure() builds (same seed, same weights)
        import torch

        from models.ctrgcn import config_for
        from models.inference import InferenceMultiStream
        from models.two_stream import MultiStream
        from stages import export

        torch.manual_seed(0)  # one stream: the CTRGCN measure() builds, its scores unweighted
        model = MultiStream({"joint": config_for(args.size, 120)}).eval()
        export.export_onnx(InferenceMultiStream(model), Path(tmp.name) / "ours.onnx")  # as the stage does
        common += ["--onnx", str(Path(tmp.name) / "ours.onnx")]
    try:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else reversed(variants):
                results[v].append(run_one(v, common))
                print(f"round {r + 1} {v}: {results[v][-1]}", file=sys.stderr)
    except MeasurementFailed as exc:
        print(f"gcn_throughput: {exc}", file=sys.stderr)
        return 1
    finally:
        tmp.cleanup()
    base = variants[0]
    med = {
        v: {k: statistics.median(m[k] for m in ms) for k in ("train_samples_per_s", "latency_ms")}
        for v, ms in results.items()
    }
    print(
        f"CTR-GCN {args.size}, B={args.batch} T={args.frames} M=2, {args.threads} threads, {args.device}, "
        f"median of {args.rounds} rounds (baseline: {base})"
    )
    if args.device == "cpu":
        print(f"native bf16 on this CPU: {'yes' if cpu_has_bf16() else 'no (ours-bf16 is emulated)'}")
    print(f"{'variant':<20} {'train samples/s':>16} {'x':>6} {'batch-1 ms':>11} {'x':>6}")
    for v, m in med.items():
        speed = m["train_samples_per_s"] / med[base]["train_samples_per_s"]
        lat = med[base]["latency_ms"] / m["latency_ms"]
        print(
            f"{v:<20} {m['train_samples_per_s']:>16.2f} {speed:>5.2f}x {m['latency_ms']:>11.1f} {lat:>5.2f}x"
            if speed == speed  # not NaN: a model that trains here
            else f"{v:<20} {'-':>16} {'':>6} {m['latency_ms']:>11.1f} {lat:>5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
