"""Stage ``export``: the fused model as ONNX (+ INT8, + TensorRT where CUDA is present), checked, bundled.

From ``evaluate``'s ``model.pt`` (the fused multi-stream model):

1. **ONNX** (opset ``export.opset``, the dynamo exporter) taking normalised joints
   ``joints (N, 3, T, 25, 2)`` and returning fused class scores ``scores (N, K)``, with the bone and
   motion streams and the fusion inside the graph; batch and T are dynamic. What is exported is the
   model rebuilt for inference (:class:`models.inference.InferenceMultiStream`: batch norms folded,
   fewer and cheaper operators, the same function). The graph is checked:
   no ``Einsum`` node and no tensor above rank 4 except the input (ONNX shape inference).
2. **Parity**: ONNX Runtime against PyTorch on the test split (centre clip): the largest score
   difference and the top-1 agreement, which must be 100% (the stage fails otherwise).
3. **INT8**: static post-training quantisation with ONNX Runtime (QDQ, per-channel weights),
   calibrated on ``calibration_samples`` training clips; its top-1 change on the test split and its
   batch-1 latency against fp32, same threads, same run.
4. **TensorRT** when CUDA and the ``tensorrt`` package are present (TensorRT 10/11 API): an engine with
   optimisation profiles for batch 1/8/64 and T up to ``tensorrt_max_frames``, checked against ONNX
   Runtime. Otherwise the report says ``tensorrt: skipped (...)`` and the stage succeeds.
5. **Bundle** (:mod:`stages.bundle`): model files, label map, input spec, normalisation and sampling,
   fusion weights, metrics and a sha256 manifest, for ``uvicorn serving.app:app``.

The graphs are built first; then one pass over the test split, a block at a time
(:func:`split_blocks`), scores it with each of them for the checks, so memory does not grow with
the split.

    python -m stages.export --model data/evaluate/model.pt --features-dir data/features \\
        --out-dir data/export --metrics data/reports/export/metrics.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.ctrgcn import CTRGCNConfig
from models.inference import InferenceMultiStream
from models.skeleton import MAX_PERSONS, NUM_JOINTS
from models.two_stream import MultiStream, SoloStreams
from stages import bundle
from stages.dataset import LoaderParams, SkeletonDataset
from stages.denoise import COMPLETE, DENOISE_MODES
from stages.features import FeaturesParams
from stages.params import ParamsError, load_section, usable_cpus
from stages.parse import denoise_mode
from stages.store import atomic_directory, write_metrics

INPUT, OUTPUT = "joints", "scores"
MIN_FRAMES = 8  # shortest T the graph is exported for (two stride-2 stages)
# The TensorRT engine's top-1 agreement with ONNX Runtime on the test clips for it to go into the
# bundle (the "fp32" engine may use TF32, which can flip a near-tie, so not quite 1)
TENSORRT_MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class ExportParams:
    """The ``export`` section of params.yaml."""

    opset: int = 18
    parity_samples: int = 0  # test samples compared (0 = the whole test split)
    parity_tolerance: float = 1e-3  # largest |ONNX - PyTorch| score accepted
    int8: bool = True
    calibration_samples: int = 256  # training clips the INT8 ranges are calibrated on
    int8_max_drop: float = 1.0  # top-1 points INT8 may lose; beyond, it is left out of the bundle
    latency_runs: int = 50  # batch-1 timings per runtime (the median is reported)
    threads: int = 0  # ONNX Runtime intra-op threads (0 = cores)
    tensorrt: str = "auto"  # auto (when CUDA + tensorrt) | off
    tensorrt_batches: tuple[int, ...] = (1, 8, 64)  # one optimisation profile per batch size
    tensorrt_max_frames: int = 300
    name: str = "ntu120-ctrgcn"

    def validate(self) -> None:
        if self.opset < 17:
            raise ParamsError("params.yaml [export] opset: 17 or newer")
        if self.tensorrt not in ("auto", "off"):
            raise ParamsError("params.yaml [export] tensorrt: auto | off")
        if self.calibration_samples < 1 or self.latency_runs < 1 or self.parity_samples < 0:
            raise ParamsError("params.yaml [export]: calibration_samples, latency_runs >= 1")
        batches = list(self.tensorrt_batches)
        if not batches or batches[0] < 1 or sorted(set(batches)) != batches or self.tensorrt_max_frames < 64:
            # one profile per batch size, each from the previous size + 1: a repeated size is empty
            raise ParamsError(
                "params.yaml [export]: tensorrt_batches strictly ascending from 1 or more, "
                f"tensorrt_max_frames >= 64 (got {batches}, {self.tensorrt_max_frames})"
            )


class ExportError(RuntimeError):
    """The exported model is not faithful to the trained one (or not exportable as required)."""


def _check_denoise(denoise: str) -> None:
    if denoise not in DENOISE_MODES:
        raise ExportError(f"denoise must be one of {DENOISE_MODES}, got {denoise!r}")


# ---- the model -----------------------------------------------------------------------------------


def load_fused(path: Path) -> tuple[MultiStream, dict]:
    """``evaluate``'s ``model.pt`` -> the fused model (eval mode) and its metadata (no pickled code)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("kind") != "multistream":
        raise ExportError(f"{path}: not a fused multi-stream model (kind {ck.get('kind')!r})")
    configs = {name: CTRGCNConfig.from_dict(cfg) for name, cfg in ck["configs"].items()}
    model = MultiStream(configs, fusion=ck["fusion"], weights=ck["weights"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), {k: v for k, v in ck.items() if k != "state_dict"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines and warnings (it prints a dozen per export)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4
        try:
            yield
        except Exception:
            sys.stderr.write(err.getvalue()[-4000:])
            raise


def export_onnx(
    model: torch.nn.Module, path: Path, opset: int = 18, frames: int = 64, persons: int = MAX_PERSONS
) -> None:
    """Export ``model`` (joints -> scores) to ``path``, one file: dynamic batch, and dynamic T unless
    the model is a one-person graph (:class:`SoloStreams`, or an :class:`InferenceMultiStream` built
    for one person: fixed to its ``frames``)."""
    model = model.eval().cpu()
    example = torch.zeros(2, 3, frames, NUM_JOINTS, persons)
    example[:, :, :, :, 0] = torch.randn(2, 3, frames, NUM_JOINTS, generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    if not (isinstance(model, SoloStreams) or getattr(model, "solo", False)):
        dims[2] = torch.export.Dim("frames", min=MIN_FRAMES, max=4096)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(dims,),  # positional: any forward argument name
            optimize=True,
        )
    save_onnx(program.model_proto, path)


def strip_trace_metadata(proto) -> None:
    """Drop the exporter's per-node trace notes (``pkg.torch.onnx.stack_trace``, ``fx_node``,
    ``namespace``...) and its notes on the graph (``pkg.torch.export.ExportedProgram...``) in place.

    The node notes hold the absolute paths of the source files that were traced, so the same weights
    exported from two checkouts gave different bytes (and a different content-hashed bundle version);
    they are also 6-14% of the file. The graph's notes print the exported program's signature and
    its shape-range constraints as a dict whose order follows Python's string hashing, which changes
    from process to process: two exports of the same weights differed in those bytes alone. The graph
    and its weights are untouched (the graphs exported here have no subgraphs: a node inside an If or
    Loop body would keep its notes, and the tests would see them).
    """
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    del proto.graph.metadata_props[:]


def save_onnx(proto, path: Path) -> None:
    """Check ``proto``, strip its trace notes (:func:`strip_trace_metadata`) and save it as one file."""
    import onnx

    strip_trace_metadata(proto)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def graph_report(path: Path) -> dict:
    """Operators of the ONNX graph and the largest rank of any tensor but the input (shape inference).

    Raises :class:`ExportError` on an ``Einsum`` node, a tensor above rank 4, or a tensor whose rank
    inference cannot tell.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True, data_prop=True)
    graph = model.graph
    ops = sorted({n.op_type for n in graph.node})
    if "Einsum" in ops:
        raise ExportError(f"{path}: the graph has an Einsum node")
    inputs = {i.name for i in graph.input}
    ranks, unknown = {}, []
    for info in [*graph.value_info, *graph.output]:
        if info.name in inputs:
            continue
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            unknown.append(info.name)
            continue
        ranks[info.name] = len(tensor_type.shape.dim)
    produced = {out for n in graph.node for out in n.output if out}
    unknown += sorted(produced - set(ranks) - inputs)
    if unknown:
        raise ExportError(f"{path}: shape inference cannot tell the rank of {unknown[:5]}")
    big = {name: r for name, r in ranks.items() if r > 4}
    if big:
        raise ExportError(f"{path}: tensors above rank 4: {sorted(big.items())[:5]}")
    return {
        "operators": ops,
        "nodes": len(graph.node),
        "max_intermediate_rank": max(ranks.values()),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


# ---- ONNX Runtime -------------------------------------------------------------------------------


def ort_session(path: Path, threads: int = 0, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


# Clips per model call on a CPU (the stage's checks over the test split, the server's large
# requests). On a 2-core CPU, the default model's 1,146 test clips at batch 8 against 64: ONNX
# Runtime 6.0 against 8.5 s with 0.37 against 2.85 GB of arena (it keeps its largest batch's),
# PyTorch 9.6 against 25.1 s (a big batch's working set leaves the caches); the export stage's peak
# RSS went from 7.8 to 1.9 GB.
CPU_BATCH = 8


def ort_scores(session, clips: np.ndarray, batch: int = 64) -> np.ndarray:
    """Scores ``(N, K)`` of ``clips`` ``(N, 3, T, 25, 2)`` in batches."""
    return np.concatenate(
        [session.run([OUTPUT], {INPUT: clips[i : i + batch]})[0] for i in range(0, len(clips), batch)]
    )


@torch.inference_mode()
def torch_scores(model: torch.nn.Module, clips: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [model(torch.from_numpy(clips[i : i + batch])).numpy() for i in range(0, len(clips), batch)]
    )


def split_blocks(
    features_dir: Path,
    benchmark: str,
    split: str,
    loader: LoaderParams,
    limit: int = 0,
    seed: int = 0,
    block: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Centre clips ``(n, 3, window, 25, 2)`` and labels of a split, ``block`` samples at a time
    (``limit``: a seeded subset), so the checks over a whole test split hold one block in memory
    (NTU-120's X-Sub test split is 50,919 clips, 2 GB as one array)."""
    centre = dataclasses.replace(loader, sampling="crop_resize", test_clips=1)
    ds = SkeletonDataset(
        features_dir, stream="joint", benchmark=benchmark, split=split, params=centre, train=False
    )
    order = np.arange(len(ds))
    if 0 < limit < len(ds):
        order = np.sort(np.random.default_rng(seed).choice(len(ds), limit, replace=False))
    if len(order) == 0:
        raise ExportError(f"{features_dir}: the {benchmark} {split} split is empty")
    for start in range(0, len(order), block):
        items = [ds[int(i)] for i in order[start : start + block]]
        yield np.stack([x.numpy() for x, _ in items]), np.array([y for _, y in items])


def split_clips(
    features_dir: Path, benchmark: str, split: str, loader: LoaderParams, limit: int = 0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Centre clips ``(N, 3, window, 25, 2)`` and labels of a split as one array each (``limit``: a
    seeded subset): for small sets (INT8 calibration, tests); see :func:`split_blocks`."""
    blocks = list(split_blocks(features_dir, benchmark, split, loader, limit, seed))
    return np.concatenate([c for c, _ in blocks]), np.concatenate([y for _, y in blocks])


def call_times_ms(run, clip: np.ndarray, runs: int, warmup: int = 5) -> list[float]:
    """Wall times (ms) of ``runs`` calls of ``run(clip)``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run(clip)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(clip)
        times.append((time.perf_counter() - start) * 1000)
    return times


def batch1_latency_ms(run, clip: np.ndarray, runs: int) -> float:
    """Median wall time of ``run(clip)`` over ``runs`` calls, in ms."""
    return round(statistics.median(call_times_ms(run, clip, runs)), 3)


class _Calibration:
    """ONNX Runtime's calibration reader over training clips, one at a time."""

    def __init__(self, clips: np.ndarray, batch: int = 16):
        self._batches = iter([clips[i : i + batch] for i in range(0, len(clips), batch)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self):  # pragma: no cover - required by newer readers' protocol, unused by minmax
        pass


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static INT8 calibrated on ``calibration``: QDQ, per-channel int8 weights, uint8 activations.

    Only the convolutions, matmuls and the classifier are quantised: they hold the arithmetic. Also
    quantising the elementwise ops (the bone gather and subtraction, the graph's tanh/max/add) cost
    80 points of top-1 on the default corpus, for no speed.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calibration)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


# ---- TensorRT ---------------------------------------------------------------------------------


def tensorrt_available() -> str | None:
    """None when a TensorRT engine can be built here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install tensorrt)"
    return None


@functools.cache
def _trt_logger():
    """The process's one TensorRT logger (TensorRT warns when its objects get different ones)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_tensorrt(onnx_path: Path, engine_path: Path, batches: tuple[int, ...], max_frames: int) -> dict:
    """Build a TensorRT engine (10/11 API) with one optimisation profile per batch size in ``batches``."""
    import tensorrt as trt

    logger = _trt_logger()
    builder = trt.Builder(logger)
    if int(trt.__version__.split(".")[0]) < 10:
        raise ExportError(f"TensorRT {trt.__version__}: 10 or newer needed")
    # Strongly typed: the types are the ONNX file's (fp32 here). Weak typing is deprecated since 10.12;
    # in 11 every network is strongly typed and the flag is accepted and ignored.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    low = 1
    profiles = []
    for b in batches:
        profile = builder.create_optimization_profile()
        shape = (3, None, NUM_JOINTS, MAX_PERSONS)
        profile.set_shape(
            INPUT,
            (low, shape[0], MIN_FRAMES, *shape[2:]),
            (b, shape[0], 64, *shape[2:]),
            (b, shape[0], max_frames, *shape[2:]),
        )
        config.add_optimization_profile(profile)
        profiles.append({"batch": [low, b], "frames": [MIN_FRAMES, 64, max_frames]})
        low = b + 1
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    return {
        "version": trt.__version__,
        "profiles": profiles,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def engine_parity(engine_scores: np.ndarray, onnx_scores: np.ndarray) -> dict:
    """The engine's scores of the test clips against ONNX Runtime's, and whether it goes into the
    bundle: finite scores of the same shape and top-1 agreement of at least
    :data:`TENSORRT_MIN_AGREEMENT` (the server's ``auto`` runtime prefers an engine to ONNX)."""
    engine_scores = np.asarray(engine_scores, dtype=np.float32)
    if engine_scores.shape != onnx_scores.shape or not np.isfinite(engine_scores).all():
        return {"max_abs_diff_vs_onnx": None, "top1_agreement_vs_onnx": 0.0, "in_bundle": False,
                "shape": list(engine_scores.shape)}  # fmt: skip
    agreement = round(float(np.mean(engine_scores.argmax(1) == onnx_scores.argmax(1))), 5)
    return {
        "max_abs_diff_vs_onnx": float(np.abs(engine_scores - onnx_scores).max()),
        "top1_agreement_vs_onnx": agreement,
        "in_bundle": agreement >= TENSORRT_MIN_AGREEMENT,
    }


class TensorRTRunner:
    """Run a serialized engine on CUDA tensors; picks the smallest profile that fits the batch."""

    def __init__(self, engine_path: Path, batches: tuple[int, ...]):
        import tensorrt as trt

        self.runtime = trt.Runtime(_trt_logger())
        self.engine = engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:  # built by another TensorRT version or for another GPU
            raise ExportError(
                f"TensorRT {trt.__version__} cannot load the engine {engine_path} (see its log)"
            )
        if engine.num_optimization_profiles != len(batches):
            raise ExportError(
                f"{engine_path}: {engine.num_optimization_profiles} optimisation profiles, "
                f"not one per batch size of {list(batches)}"
            )
        io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {INPUT: trt.TensorIOMode.INPUT, OUTPUT: trt.TensorIOMode.OUTPUT}
        if io != set(expected) or any(
            engine.get_tensor_mode(name) != mode or engine.get_tensor_dtype(name) != trt.DataType.FLOAT
            for name, mode in expected.items()
        ):
            raise ExportError(
                f"{engine_path}: not this model's engine (float32 {INPUT} -> {OUTPUT}; has {io})"
            )
        self.context = engine.create_execution_context()
        self.batches = batches
        self.stream = torch.cuda.Stream()
        self.profile = -1

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        n = clips.shape[0]
        profile = next((i for i, b in enumerate(self.batches) if n <= b), None)
        if profile is None:
            return np.concatenate(
                [self(clips[i : i + self.batches[-1]]) for i in range(0, n, self.batches[-1])]
            )
        x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32)).cuda()
        with torch.cuda.stream(self.stream):
            if profile != self.profile:
                if not self.context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                    raise ExportError(f"TensorRT refused optimisation profile {profile}")
                self.profile = profile
            if not self.context.set_input_shape(INPUT, tuple(x.shape)):
                raise ExportError(f"the TensorRT engine's profiles do not take input {tuple(x.shape)}")
            out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), device="cuda")
            self.context.set_tensor_address(INPUT, x.data_ptr())
            self.context.set_tensor_address(OUTPUT, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ExportError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()


# ---- the stage ---------------------------------------------------------------------------------


def _top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return round(float(np.mean(scores.argmax(1) == labels)), 5)


def score_blocks(
    runs: dict[str, Callable[[np.ndarray], np.ndarray]], blocks: Iterator[tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Each of ``runs``' scores ``(N, K)`` of the clips of ``blocks`` (one pass, one block in memory),
    the labels, and the first clip ``(1, 3, T, 25, 2)``."""
    scores: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    labels, first = [], None
    for clips, y in blocks:
        first = clips[:1].copy() if first is None else first
        for name, run_ in runs.items():
            scores[name].append(np.asarray(run_(clips)))
        labels.append(y)
    return {n: np.concatenate(v) for n, v in scores.items()}, np.concatenate(labels), first


def run(
    params: ExportParams,
    loader: LoaderParams,
    features_params: FeaturesParams,
    *,
    model_path: Path,
    features_dir: Path,
    out_dir: Path,
    metrics_path: Path | None = None,
    denoise: str = COMPLETE,
) -> dict:
    """Export, check and bundle; returns the report (also written to ``metrics_path``). ``denoise``:
    the parse stage's mode (``parse.denoise``), recorded in the bundle for the server's uploads.

    Every graph is built first; then one pass over the test split scores its clips with each, a
    block at a time, so memory does not grow with the split."""
    _check_denoise(denoise)
    model, meta = load_fused(model_path)
    trained = meta.get("denoise", COMPLETE)  # evaluate's model.pt says so when not the default
    if trained != denoise:
        raise ExportError(
            f"{model_path}: the model learnt from .skeleton files denoised {trained!r}, but parse.denoise "
            f"is {denoise!r}; the server would prepare uploads otherwise: rerun the pipeline with one mode"
        )
    torch.set_num_threads(params.threads or usable_cpus())
    report: dict = {"streams": list(model.names), "fusion": meta["fusion"]}
    with atomic_directory(Path(out_dir)) as tmp:
        work = tmp / "bundle"
        work.mkdir()
        fp32 = work / "model.onnx"
        started = time.perf_counter()
        export_onnx(InferenceMultiStream(model), fp32, params.opset, loader.window)
        graph = report["onnx"] = {**graph_report(fp32), "bytes": fp32.stat().st_size}
        print(
            f"export: ONNX opset {params.opset} in {time.perf_counter() - started:.1f} s, "
            f"{graph['nodes']} nodes, max intermediate rank {graph['max_intermediate_rank']}"
        )
        files = {"fp32": fp32.name, "int8": None, "tensorrt": None, "solo": None}
        session = ort_session(fp32, params.threads)
        runs: dict[str, Callable] = {
            "torch": lambda c: torch_scores(model, c, CPU_BATCH),
            "onnx": lambda c: ort_scores(session, c, CPU_BATCH),
        }
        solo = work / "model.solo.onnx" if model_persons(model) > 1 else None
        if solo is not None:
            export_onnx(
                InferenceMultiStream(model, loader.window), solo, params.opset, loader.window, persons=1
            )
            solo_session = ort_session(solo, params.threads)
            runs["torch_alone"] = lambda c: torch_scores(model, without_others(c), CPU_BATCH)
            runs["solo"] = lambda c: ort_scores(solo_session, np.ascontiguousarray(c[..., :1]), CPU_BATCH)
        int8 = work / "model.int8.onnx" if params.int8 else None
        if int8 is not None:
            calib, _ = split_clips(
                features_dir, meta["benchmark"], "train", loader, params.calibration_samples, seed=1
            )
            quantize_int8(fp32, int8, calib)
            q_session = ort_session(int8, params.threads)
            runs["int8"] = lambda c: ort_scores(q_session, c, CPU_BATCH)
        reason = "off in params" if params.tensorrt == "off" else tensorrt_available()
        if reason is None:
            engine = work / "model.plan"
            trt_info = build_tensorrt(fp32, engine, params.tensorrt_batches, params.tensorrt_max_frames)
            runs["tensorrt"] = runner = TensorRTRunner(engine, params.tensorrt_batches)

        blocks = split_blocks(features_dir, meta["benchmark"], "test", loader, params.parity_samples)
        scores, labels, one = score_blocks(runs, blocks)
        ref, onnx_scores = scores["torch"], scores["onnx"]
        agreement = float(np.mean(ref.argmax(1) == onnx_scores.argmax(1)))
        report["parity"] = {
            "samples": len(labels),
            "max_abs_diff": float(np.abs(ref - onnx_scores).max()),
            "top1_agreement": round(agreement, 6),
            "torch_top1": _top1(ref, labels),
            "onnx_top1": _top1(onnx_scores, labels),
        }
        print(
            f"export: parity on {len(labels)} test clips: max |diff| {report['parity']['max_abs_diff']:.2e}, "
            f"top-1 agreement {agreement:.2%}"
        )
        if agreement < 1.0 or report["parity"]["max_abs_diff"] > params.parity_tolerance:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch: {report['parity']}")

        latency = {
            "torch_eager": batch1_latency_ms(lambda c: torch_scores(model, c), one, params.latency_runs),
            "onnx_fp32": batch1_latency_ms(
                lambda c: session.run([OUTPUT], {INPUT: c}), one, params.latency_runs
            ),
        }
        if solo is not None:
            report["solo"] = solo_report(solo, scores["torch_alone"], scores["solo"], params, loader.window)
            latency["onnx_fp32_solo"] = batch1_latency_ms(
                lambda c: solo_session.run([OUTPUT], {INPUT: c}),
                np.ascontiguousarray(one[..., :1]),
                params.latency_runs,
            )
            files["solo"] = solo.name
        if int8 is not None:
            q_scores = scores["int8"]
            latency["onnx_int8"] = batch1_latency_ms(
                lambda c: q_session.run([OUTPUT], {INPUT: c}), one, params.latency_runs
            )
            change = round((_top1(q_scores, labels) - report["parity"]["onnx_top1"]) * 100, 3)
            accepted = -change <= params.int8_max_drop
            report["int8"] = {
                "top1": _top1(q_scores, labels),
                "top1_change_points": change,
                "top1_agreement_with_fp32": round(
                    float(np.mean(q_scores.argmax(1) == onnx_scores.argmax(1))), 5
                ),
                "calibration_samples": len(calib),
                "in_bundle": accepted,
                "bytes": int8.stat().st_size,
            }
            print(
                f"export: INT8 top-1 {report['int8']['top1']:.4f} ({change:+.2f} points vs fp32)"
                + ("" if accepted else f", beyond the {params.int8_max_drop} allowed: left out of the bundle")
            )
            if accepted:
                files["int8"] = int8.name
            else:
                int8.unlink()
        report["latency_ms_batch1"] = latency
        report["threads"] = params.threads or usable_cpus()

        if reason is None:
            info = {**trt_info, **engine_parity(scores["tensorrt"], onnx_scores)}
            info["latency_ms_batch1"] = batch1_latency_ms(runner, one, params.latency_runs)
            report["tensorrt"] = info
            if info["in_bundle"]:
                files["tensorrt"] = engine.name
                (work / "tensorrt.json").write_text(json.dumps(info, indent=2) + "\n")
            else:
                engine.unlink()
            print(
                f"export: tensorrt: engine built, top-1 agreement with ONNX Runtime "
                f"{info['top1_agreement_vs_onnx']:.2%}, max |diff| {info['max_abs_diff_vs_onnx']:.2e}"
                + (
                    ""
                    if info["in_bundle"]
                    else f", under {TENSORRT_MIN_AGREEMENT:.0%}: left out of the bundle"
                )
            )
        else:
            report["tensorrt"] = f"skipped ({reason})"
            print(f"export: tensorrt: {report['tensorrt']}")

        write_bundle(work, params, meta, loader, features_params, files, report, denoise)
    if metrics_path is not None:
        write_metrics(metrics_path, report)
    return report


def model_persons(model: MultiStream) -> int:
    return next(iter(model.streams.values())).cfg.num_persons


def without_others(clips: np.ndarray) -> np.ndarray:
    """``clips`` with every person but the first all zeros (absent)."""
    alone = clips.copy()
    alone[..., 1:] = 0
    return alone


def solo_report(path: Path, ref: np.ndarray, got: np.ndarray, params: ExportParams, window: int) -> dict:
    """The one-person graph at ``path`` (:class:`SoloStreams`' function, built for inference by
    :class:`InferenceMultiStream`, T fixed to ``window``): its scores ``got`` of the test clips' first
    person against the full PyTorch model's ``ref`` of those clips with the others removed. Raises
    :class:`ExportError` when the two disagree."""
    graph = graph_report(path)
    report = {
        "samples": len(ref),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "top1_agreement": round(float(np.mean(ref.argmax(1) == got.argmax(1))), 6),
        "frames": window,
        "bytes": path.stat().st_size,
        "nodes": graph["nodes"],
        "max_intermediate_rank": graph["max_intermediate_rank"],
    }
    print(
        f"export: one-person graph: max |diff| {report['max_abs_diff']:.2e} against the full model with "
        f"the second person removed, top-1 agreement {report['top1_agreement']:.2%}"
    )
    if report["top1_agreement"] < 1.0 or report["max_abs_diff"] > params.parity_tolerance:
        raise ExportError(f"the one-person graph disagrees with the full model: {report}")
    return report


def write_bundle(
    work: Path,
    params: ExportParams,
    meta: dict,
    loader: LoaderParams,
    features_params: FeaturesParams,
    files: dict,
    report: dict,
    denoise: str = COMPLETE,
) -> dict:
    """Write ``labels.json``, ``bundle.json`` and the manifest beside the model files in ``work``.
    ``denoise``: the parse stage's mode, which the server applies to uploaded ``.skeleton`` files."""
    _check_denoise(denoise)
    labels = [
        {"index": i, "id": int(cid), "name": name}
        for i, (cid, name) in enumerate(zip(meta["class_ids"], meta["class_names"], strict=True))
    ]
    (work / bundle.LABELS).write_text(json.dumps(labels, indent=2) + "\n")
    version = bundle.sha256_file(work / files["fp32"])[:12]
    info = {
        "format": bundle.FORMAT,
        "name": params.name,
        "version": version,
        "benchmark": meta["benchmark"],
        "streams": meta["streams"],
        "fusion": meta["fusion"],
        "fusion_weights": meta["weights"],
        "input": {
            "name": INPUT,
            "output": OUTPUT,
            "layout": "N, C=3, T, V=25, M=2",
            "channels": 3,
            "joints": NUM_JOINTS,
            "persons": MAX_PERSONS,
            "window": loader.window,
            "min_frames": MIN_FRAMES,
            "units": "metres, camera space, then normalised as below",
            "scores": "fused class scores (logits); softmax gives probabilities",
        },
        "normalisation": {
            "centre": "actor 1 spine-middle, first frame",
            "view_align": features_params.view_align,
            # The parse stage's denoising of .skeleton files; absent means "complete", so bundles
            # exported before the mode existed (and the default ones) stay as they were.
            **({"denoise": denoise} if denoise != COMPLETE else {}),
        },
        "sampling": dataclasses.asdict(loader),
        "files": files,
        "metrics": {"evaluate": meta.get("metrics", {}), "export": report},
    }
    (work / bundle.META).write_text(json.dumps(info, indent=2) + "\n")
    bundle.write_manifest(work)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--model", required=True, type=Path, help="evaluate's model.pt")
    ap.add_argument("--features-dir", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path, help="gets bundle/ (replaced atomically)")
    ap.add_argument("--metrics", type=Path, help="write the report here (DVC metrics)")
    ap.add_argument("--name", help="the bundle's name (default: export.name)")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "export", ExportParams)
        if args.name:
            params = dataclasses.replace(params, name=args.name)
        loader = load_section(args.params, "loader", LoaderParams)
        features_params = load_section(args.params, "features", FeaturesParams)
        denoise = denoise_mode(args.params)
        run(
            params,
            loader,
            features_params,
            model_path=args.model,
            features_dir=args.features_dir,
            out_dir=args.out_dir,
            metrics_path=args.metrics,
            denoise=denoise,
        )
    except (ParamsError, ExportError, FileNotFoundError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
