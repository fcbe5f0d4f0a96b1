"""Load test of the FastAPI service: a real ``uvicorn serving.app:app`` on loopback, clients posting clips.

For each micro-batching setting (off, on) a fresh server is started on the bundle (``--bundle``) and,
for each concurrency in ``--clients`` (1, 8, 32), that many closed-loop clients post the same clip to
``POST /v1/predict`` for ``--seconds`` after a warm-up; printed: requests/s, p50/p99 latency (client
side, request written to response read), errors (any answer but 200 or a broken connection) and the
mean clips per model call the server reports. Then one WebSocket client streams a clip's frames to
``WS /v1/stream`` at ``--fps`` and the per-prediction latency is printed (server side: arrival of the
frame that completes a window to the prediction sent; client side: that frame sent to its prediction
received).

The baseline, measured in this run with the same threads and the server idle: the raw ONNX Runtime
call on the clip as the service prepares it (the same ``serving.model.load`` and ``stages.preprocess``),
so ``overhead`` = service p50 at 1 client / raw call - 1 is what HTTP, JSON, validation and
preprocessing add. The raw call is measured again after the runs; the machine's speed drifts
(other work on the host), so ``vs server's call`` pairs each request with the model call the server
timed for it (``inference_ms`` of its answer): the median of latency / call - 1, at 1 client.

The clip is a raw ``.skeleton`` file of the default data (``--clip``, default: the first test-split
file of ``data/raw/synthetic``), parsed by the pipeline's parser and posted as ``(M, T, 25, 3)`` JSON
(``--body npy``: as float32 ``.npy`` bytes, ``Content-Type: application/x-npy``).
The clients are raw asyncio HTTP/1.1 keep-alive connections with pre-encoded requests, so that the
client process takes as little of the shared cores as possible.

    python -m benchmarks.serve_load [--clients 1,8,32] [--seconds 15] [--threads 0] [--body json|npy]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Load:
    """What the clients of one run saw."""

    latencies_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)  # each answer's inference_ms (the server's call)
    read_model_ms: bool = False  # parse the answers for model_ms (used at 1 client only: client CPU)
    answered: int = 0  # responses read, warm-up included (the CPU time per request divides by it)
    errors: int = 0
    first_error: str = ""

    def fail(self, why: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or why


class ServerError(RuntimeError):
    """The server under test did not start (its log has why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def server(bundle: Path, port: int, env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """A ``uvicorn serving.app:app`` process on ``port``, ready (its /ready answered 200): (its base
    URL, its pid)."""
    cmd = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NTU_SERVE_")}
    full_env |= {"NTU_SERVE_BUNDLE_DIR": str(bundle), **env}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise ServerError(f"the server exited with {proc.returncode}; see {log}")
            try:
                get_json(base + "/ready")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerError(f"the server was not ready within 120 s; see {log}") from None
                time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post_request(port: int, path: str, body: bytes, media_type: str = "application/json") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {media_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length (what uvicorn sends for JSON answers)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = (line.partition(":") for line in lines[1:])
    length = next(int(v) for k, _, v in fields if k.lower() == "content-length")
    return status, await reader.readexactly(length)


async def client(port: int, request: bytes, start: float, stop: float, load: Load) -> None:
    """Post ``request`` back to back until ``stop``; record the latencies of requests sent after ``start``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (sent := time.perf_counter()) < stop:
            try:
                writer.write(request)
                status, body = await read_response(reader)
                load.answered += 1
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
                load.fail(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if sent < start:
                continue
            if status != 200:
                load.fail(f"HTTP {status}: {body[:200]!r}")
            else:
                load.latencies_ms.append((time.perf_counter() - sent) * 1000)
                if load.read_model_ms:
                    load.model_ms.append(json.loads(body)["inference_ms"])
    finally:
        writer.close()


async def run_load(port: int, request: bytes, clients: int, warmup: float, seconds: float) -> Load:
    load = Load(read_model_ms=clients == 1)
    now = time.perf_counter()
    start, stop = now + warmup, now + warmup + seconds
    await asyncio.gather(*(client(port, request, start, stop, load) for _ in range(clients)))
    return load


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def batch_stats(base: str) -> tuple[float, float]:
    """(model calls, clips) so far, from the server's Prometheus metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    calls = clips = 0.0
    for line in text.splitlines():
        if line.startswith("ntu_serve_batch_clips_count"):
            calls = float(line.split()[-1])
        elif line.startswith("ntu_serve_batch_clips_sum"):
            clips = float(line.split()[-1])
    return calls, clips


async def stream(port: int, frames: np.ndarray, fps: float) -> tuple[list[float], list[float], int]:
    """Send ``frames`` ``(T, M, 25, 3)`` at ``fps``; (server latencies, client latencies, errors)."""
    import websockets

    server_ms, client_ms, errors = [], [], 0
    sent_at: dict[int, float] = {}
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:

        async def receive() -> None:
            nonlocal errors
            async for message in ws:
                msg = json.loads(message)
                if msg.get("type") != "prediction":
                    errors += 1
                    continue
                client_ms.append((time.perf_counter() - sent_at[msg["frame"]]) * 1000)
                server_ms.append(msg["latency_ms"])

        receiver = asyncio.create_task(receive())
        period, t0 = 1.0 / fps, time.perf_counter()
        for n, frame in enumerate(frames, start=1):
            await asyncio.sleep(max(0.0, t0 + n * period - time.perf_counter()))
            sent_at[n] = time.perf_counter()
            await ws.send(json.dumps({"frame": frame.tolist()}))
        await asyncio.sleep(1.0)  # the last predictions
        await ws.close()
        await receiver
    return server_ms, client_ms, errors


def default_clip(raw_dir: Path) -> Path:
    """The first test-split (X-Sub) file of ``raw_dir``: the data the model was evaluated on."""
    from stages.ntu_files import parse_name, split_membership

    for path in sorted(raw_dir.rglob("*.skeleton")):
        try:
            sample = parse_name(path.stem)
        except ValueError:  # not an NTU name
            continue
        if split_membership(sample)["ntu120_xsub"] == "test":
            return path
    raise SystemExit(
        f"serve_load: no test-split .skeleton file under {raw_dir}: run `make run` first, or pass --clip"
    )


def load_clip(path: Path) -> np.ndarray:
    """A ``.skeleton`` file -> the client's ``(M, T, 25, 3)`` clip (empty second actor dropped)."""
    from stages import preprocess

    joints = preprocess.joints_from_skeleton_file(path.read_bytes())  # (3, T, 25, 2)
    clip = joints.transpose(3, 1, 2, 0)
    if not clip[1].any():
        clip = clip[:1]
    return clip.astype(np.float64).round(4)  # millimetres: what a sensor sends


def raw_ort_ms(
    bundle: Path, clip: np.ndarray, env: dict[str, str], runs: int, body: bytes, npy: bool
) -> tuple[float, float, dict]:
    """(median ms of one model call, median ms of preprocessing, the runtime) on the service's own
    path, with the server's settings ``env``; the preprocessing starts from the request's ``body``
    (``.npy`` bytes if ``npy``, else JSON), read as the service reads it."""
    from serving.model import load
    from serving.schemas import npy_clip, plain_clip
    from serving.settings import Settings
    from stages import export, preprocess

    settings = {k.removeprefix("NTU_SERVE_").lower(): v for k, v in env.items()}
    model = load(Settings(bundle_dir=bundle, **settings))
    try:
        limits = preprocess.ClipLimits()

        def prep(c: list) -> np.ndarray:
            return preprocess.prepare(preprocess.joints_from_clip(c, limits), model.loader, model.view_align)

        clips = prep(clip.tolist())
        call = statistics.median(export.call_times_ms(model.run, clips, runs, warmup=5))
        read = npy_clip if npy else plain_clip
        preparing = statistics.median(export.call_times_ms(lambda b: prep(read(b)), body, runs, warmup=2))
    finally:
        model.cleanup.close()
    return call, preparing, {**model.runtime, "clips": len(clips)}


def stream_frames(clip: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames ``(count, M, 25, 3)``: the clip played forwards and backwards, over and over
    (a stream longer than one recording, with no jump at the joins)."""
    frames = clip.transpose(1, 0, 2, 3)
    cycle = np.concatenate([frames, frames[::-1]])
    return np.resize(cycle, (count, *frames.shape[1:]))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("data/export/bundle"))
    ap.add_argument("--clip", type=Path, help="a .skeleton file (default: the first test-split file)")
    ap.add_argument("--raw-dir", type=Path, default=Path("data/raw/synthetic"))
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=0, help="NTU_SERVE_WORKERS (0 = the server's default)")
    ap.add_argument("--threads", type=int, default=0, help="NTU_SERVE_THREADS (0 = the server's default)")
    ap.add_argument("--batching", default="off,on", help="micro-batching settings to run")
    ap.add_argument("--solo", default="on", choices=("on", "off"), help="NTU_SERVE_SOLO")
    ap.add_argument("--fps", type=float, default=30.0, help="WebSocket frame rate (0: skip the stream)")
    ap.add_argument("--stream-frames", type=int, default=410, help="frames streamed (window 90 + 40 strides)")
    ap.add_argument("--log", type=Path, default=Path("/tmp/serve_load.log"))
    ap.add_argument(
        "--body", default="json", choices=("json", "npy"), help="the clip as JSON, or as float32 .npy bytes"
    )
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.fps < 0:
        ap.error("--seconds must be > 0, --warmup and --fps >= 0")
    try:
        args.client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        args.client_counts = []
    if not args.client_counts or min(args.client_counts) < 1:
        ap.error(f"--clients wants positive integers like 1,8,32; got {args.clients!r}")
    modes = args.batching.split(",")
    if not set(modes) <= {"off", "on"}:
        ap.error(f"--batching wants off, on or off,on; got {args.batching!r}")
    if not (args.bundle / "manifest.json").is_file():
        print(f"serve_load: no model bundle at {args.bundle}: run `make run` first", file=sys.stderr)
        return 2
    if args.clip is not None and not args.clip.is_file():
        print(f"serve_load: --clip {args.clip} is not a file", file=sys.stderr)
        return 2

    clip_path = args.clip or default_clip(args.raw_dir)
    clip = load_clip(clip_path)
    if args.body == "npy":
        buf = io.BytesIO()
        np.save(buf, clip.astype(np.float32), allow_pickle=False)
        body, media_type, kind = buf.getvalue(), "application/x-npy", "float32 .npy"
    else:
        body, media_type, kind = json.dumps({"clip": clip.tolist()}).encode(), "application/json", "JSON"
    env = {
        "NTU_SERVE_WORKERS": str(args.workers),
        "NTU_SERVE_THREADS": str(args.threads),
        "NTU_SERVE_SOLO": str(args.solo == "on").lower(),
    }
    npy = args.body == "npy"
    from serving.model import ModelError
    from stages.bundle import BundleError

    try:
        call_ms, prep_ms, runtime = raw_ort_ms(args.bundle, clip, env, 200, body, npy)
    except (BundleError, ModelError) as exc:  # not a bundle, or one that fails the service's checks
        print(f"serve_load: {exc}", file=sys.stderr)
        return 2
    print(
        f"clip {clip_path.name}: M={clip.shape[0]} T={clip.shape[1]}, {len(body) / 1024:.0f} KiB {kind}, "
        f"{runtime['clips']} model clip(s); {os.cpu_count()} cores; {runtime['kind']} on "
        f"{runtime['provider']}, {runtime['workers']} worker(s) x {runtime['threads']} thread(s), "
        f"one-person graph: {runtime.get('solo', 'off')}"
    )
    print(f"raw ONNX Runtime call {call_ms:.2f} ms, + preprocessing {prep_ms:.2f} ms (medians, in-process)")
    print(
        f"{'batching':<9} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'clips/call':>10} {'overhead':>8} {'vs server call':>14} {'CPU ms/req: server':>18} {'client':>6}"
    )
    try:
        failed = run_modes(args, modes, env, body, media_type, clip, call_ms)
    except ServerError as exc:
        print(f"serve_load: {exc}", file=sys.stderr)
        return 1
    after_ms, _, _ = raw_ort_ms(args.bundle, clip, env, 200, body, npy)
    print(f"raw ONNX Runtime call after the runs {after_ms:.2f} ms (before: {call_ms:.2f} ms)")
    return 1 if failed else 0


def run_modes(
    args: argparse.Namespace,
    modes: list[str],
    env: dict[str, str],
    body: bytes,
    media_type: str,
    clip: np.ndarray,
    call_ms: float,
) -> bool:
    """The load runs (and the WebSocket stream) for each micro-batching mode; whether any failed."""
    failed = False
    for mode in modes:
        port = free_port()
        batching = {"NTU_SERVE_MICRO_BATCHING": str(mode == "on").lower()}
        with server(args.bundle, port, env | batching, args.log) as (base, pid):
            request = post_request(port, "/v1/predict", body, media_type)
            for clients in args.client_counts:
                before = batch_stats(base)
                cpu_before = cpu_seconds(pid), own_cpu_seconds()
                load = asyncio.run(run_load(port, request, clients, args.warmup, args.seconds))
                cpu_after = cpu_seconds(pid), own_cpu_seconds()
                after = batch_stats(base)
                per_req = [
                    (b - a) * 1000 / max(load.answered, 1) for a, b in zip(cpu_before, cpu_after, strict=True)
                ]
                per_call = (after[1] - before[1]) / max(after[0] - before[0], 1)
                lat = load.latencies_ms
                overhead = paired = ""
                if clients == 1 and lat:
                    overhead = f"{pct(lat, 50) / call_ms - 1:+.0%}"
                    ratios = [a / b for a, b in zip(lat, load.model_ms, strict=True) if b > 0]
                    paired = f"{pct(ratios, 50) - 1:+.0%} of {pct(load.model_ms, 50):.2f}"
                print(
                    f"{mode:<9} {clients:>7} {len(lat) / args.seconds:>7.1f} {pct(lat, 50):>7.1f} "
                    f"{pct(lat, 99):>7.1f} {load.errors:>6} {per_call:>10.1f} {overhead:>8} {paired:>14} "
                    f"{per_req[0]:>18.2f} {per_req[1]:>6.2f}",
                    flush=True,
                )
                if load.errors:
                    failed = True
                    print(f"  first error: {load.first_error}", file=sys.stderr)
            if args.fps > 0 and mode == modes[0]:  # the first: off, the CPU default
                settings = get_json(base + "/v1/model")["runtime"]
                frames = stream_frames(clip, args.stream_frames)
                server_ms, client_ms, errors = asyncio.run(stream(port, frames, args.fps))
                print(
                    f"WebSocket stream ({mode} batching, {settings['kind']}): {len(frames)} frames at "
                    f"{args.fps:g} fps, {len(server_ms)} predictions; latency server p50 "
                    f"{pct(server_ms, 50):.1f} ms p99 {pct(server_ms, 99):.1f} ms, client p50 "
                    f"{pct(client_ms, 50):.1f} ms p99 {pct(client_ms, 99):.1f} ms; errors {errors}"
                )
                failed |= errors > 0 or not server_ms
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
