"""The served model: a verified bundle (local or from the MLflow registry) behind one runtime.

:func:`load` finds the bundle (``settings.bundle_dir``, or ``settings.model_uri`` downloaded from
MLflow into a temporary directory and searched for its ``manifest.json``), checks every checksum with
:func:`stages.bundle.verify` and opens the runtime ``settings.runtime`` asks for:

- ``tensorrt``: the bundle's TensorRT engine (:class:`stages.export.TensorRTRunner`, CUDA only);
- ``fp32`` / ``int8``: that ONNX model in ONNX Runtime on the best available provider of
  TensorRT, CUDA, CPU; with ``fp32``, clips whose second person is absent go through the bundle's
  one-person graph (``model.solo.onnx``, the same scores for half the work) unless ``settings.solo``
  is off;
- ``auto``: the engine when the bundle has one and CUDA works, else ``fp32``.

Nothing a client sends is unpickled; the model files are opened only after their checksums match.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.skeleton import MAX_PERSONS, NUM_JOINTS
from stages import bundle, export
from stages.dataset import LoaderParams
from stages.denoise import COMPLETE, DENOISE_MODES
from stages.params import ParamsError, from_mapping, usable_cpus
from stages.registry import BUNDLE_DIR
from stages.tracking import DEFAULT_TRACKING_URI

from .settings import Settings

PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TENSORRT_BATCHES = (1, 8, 64)  # export's default profiles, for engines whose report lacks them


class ModelError(RuntimeError):
    """The model cannot be served (the reason is shown by /ready and /v1/*)."""


@dataclass
class LoadedModel:
    """A verified bundle's metadata, its preprocessing parameters and a runtime ``run(clips) -> scores``.

    ``run`` takes float32 clips ``(N, 3, window, 25, 2)`` and returns fused class scores ``(N, K)``;
    it blocks: the service calls it from a worker thread, or on the event loop for a lone client
    (``serving.activity``); it may be called from any thread.
    """

    meta: dict
    loader: LoaderParams
    view_align: bool
    run: Callable[[np.ndarray], np.ndarray]
    runtime: dict
    source: str
    workers: int = 1  # calls of ``run`` that may run at once
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    denoise: str = COMPLETE  # the parse stage's mode for uploaded .skeleton files

    @property
    def labels(self) -> list[dict]:
        return self.meta["labels"]


def find_bundle(root: Path) -> Path:
    """The directory under ``root`` (itself or the shallowest subdirectory) holding ``manifest.json``."""
    found = sorted(root.rglob(bundle.MANIFEST), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise ModelError(f"{root}: no {bundle.MANIFEST} in the downloaded artifacts (not a model bundle)")
    if len(found) > 1 and len(found[0].parts) == len(found[1].parts):
        raise ModelError(f"{root}: several bundles at the same depth: {[str(p.parent) for p in found[:3]]}")
    return found[0].parent


def download(model_uri: str, dst: Path) -> Path:
    """Download ``model_uri`` (``models:/name@alias``, ``runs:/...``, a path...) with MLflow into ``dst``."""
    import mlflow
    import mlflow.artifacts

    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    registry = os.environ.get("MLFLOW_REGISTRY_URI", uri)
    # models:/ URIs resolve against the process-wide URIs, not download_artifacts' arguments; the
    # registry's defaults to the tracking one (setting it would also set MLFLOW_REGISTRY_URI for good)
    mlflow.set_tracking_uri(uri)

    def fetch(artifact_uri: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(into), tracking_uri=uri, registry_uri=registry
            )
        )

    if model_uri.startswith("models:/") and not model_uri.rstrip("/").endswith(f"/{BUNDLE_DIR}"):
        # A version the package stage registered holds bundle/ and the training checkpoint/: fetch
        # only the bundle. Other layouts (the bundle at the version's root) are fetched whole.
        with contextlib.suppress(Exception):
            return find_bundle(fetch(f"{model_uri.rstrip('/')}/{BUNDLE_DIR}", dst / "bundle-only"))
    try:
        local = fetch(model_uri, dst / "whole")
    except Exception as exc:  # MLflow raises many kinds (MlflowException, OSError, HTTP errors)
        raise ModelError(f"cannot download {model_uri} from MLflow ({uri}): {exc}") from None
    return find_bundle(local)


def ort_providers() -> list[str]:
    """The ONNX Runtime providers of :data:`PROVIDERS` this installation has, best first."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDERS if p in available]


TENSORRT_EP = "TensorrtExecutionProvider"
GPU_BATCH = 64  # clips per call on a GPU provider (on a CPU: export.CPU_BATCH)


def tensorrt_ep_options(meta: dict, persons: int, cache_dir: Path) -> dict[str, str]:
    """ONNX Runtime's TensorRT provider options for a bundle graph taking ``persons`` persons: engine
    and timing caches in ``cache_dir`` (else every start builds the engines again, for minutes) and
    one optimisation profile for the clips the service sends, batch 1 to :data:`GPU_BATCH` of the
    bundle's window (else each new batch size builds another engine)."""
    shape = f"3x{meta['input']['window']}x{NUM_JOINTS}x{persons}"
    name = meta["input"].get("name", export.INPUT)
    cache = str(cache_dir)
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": f"{name}:1x{shape}",
        "trt_profile_opt_shapes": f"{name}:1x{shape}",
        "trt_profile_max_shapes": f"{name}:{GPU_BATCH}x{shape}",
    }


def onnx_session(
    path: Path, threads: int, meta: dict, persons: int, cache_dir: Path, tensorrt: bool = True
) -> tuple[Any, str | None]:
    """An ONNX Runtime session on the best available providers, and why the TensorRT provider was
    left out (None when it was not there, or works): with it, its options (:func:`tensorrt_ep_options`);
    a session it fails to create is made again without it, on CUDA or the CPU. ``tensorrt=False``
    leaves it out (the INT8 graph: its asymmetric uint8 quantisation is not TensorRT's)."""
    providers: list = ort_providers()
    if TENSORRT_EP not in providers:
        return export.ort_session(path, threads, providers), None
    rest = [p for p in providers if p != TENSORRT_EP]
    if not tensorrt:
        return export.ort_session(
            path, threads, rest
        ), "not used for this graph (INT8 with uint8 zero points)"
    cache_dir = cache_dir.expanduser() / meta.get("version", "bundle")
    with_options = [
        (p, tensorrt_ep_options(meta, persons, cache_dir)) if p == TENSORRT_EP else p for p in providers
    ]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        session = export.ort_session(path, threads, with_options)
    except Exception as exc:  # TensorRT missing, the cache unwritable, a graph it cannot take
        return export.ort_session(path, threads, rest), f"{type(exc).__name__}: {exc}"
    if TENSORRT_EP not in session.get_providers():  # ONNX Runtime's own fallback: it prints why
        used = ", ".join(session.get_providers())
        return session, f"ONNX Runtime could not create it and fell back to {used} (its log says why)"
    return session, None


def _onnx(
    bundle_dir: Path, meta: dict, kind: str, threads: int, solo: bool = True, cache_dir: Path | None = None
) -> tuple[Callable, dict]:
    name = meta["files"].get(kind)
    if not name:
        raise ModelError(f"{bundle_dir}: the bundle has no {kind} model (files: {meta['files']})")
    cache_dir = Path(cache_dir or Settings.model_fields["tensorrt_cache_dir"].default)
    session, skipped = onnx_session(
        bundle_dir / name, threads, meta, MAX_PERSONS, cache_dir, tensorrt=kind != "int8"
    )
    info = {
        "kind": kind,
        "file": name,
        "provider": session.get_providers()[0],
        "providers": session.get_providers(),
        **({"tensorrt_provider_skipped": skipped} if skipped else {}),
    }
    # a large request in calls of CPU_BATCH clips on a CPU: faster there, and the arena stays small
    batch = export.CPU_BATCH if info["provider"] == "CPUExecutionProvider" else GPU_BATCH
    run = partial(export.ort_scores, session, batch=batch)
    solo_name = meta["files"].get("solo") if kind == "fp32" and solo else None
    if solo_name:  # bundles before the one-person graph have none
        solo_session, _ = onnx_session(bundle_dir / solo_name, threads, meta, 1, cache_dir)
        solo_run = partial(export.ort_scores, solo_session, batch=batch)
        run = partial(route_solo, run, solo_run, meta["input"]["window"])
        info["solo"] = solo_name
    return run, info


def route_solo(full: Callable, solo: Callable, frames: int, clips: np.ndarray) -> np.ndarray:
    """Scores of ``clips`` ``(N, 3, T, 25, 2)``: those of ``frames`` frames whose second person is all
    zeros (absent) through the one-person graph ``solo``, the rest through ``full``."""
    alone = ~clips[:, :, :, :, 1:].any(axis=(1, 2, 3, 4)) if clips.shape[2] == frames else None
    if alone is None or not alone.any():
        return full(clips)
    if alone.all():
        return solo(np.ascontiguousarray(clips[..., :1]))
    one = solo(np.ascontiguousarray(clips[alone][..., :1]))
    scores = np.empty((len(clips), one.shape[1]), dtype=one.dtype)
    scores[alone], scores[~alone] = one, full(clips[~alone])
    return scores


def _tensorrt(bundle_dir: Path, meta: dict) -> tuple[Callable, dict]:
    name = meta["files"].get("tensorrt")
    if not name:
        raise ModelError(f"{bundle_dir}: the bundle has no TensorRT engine (built only where CUDA was)")
    reason = export.tensorrt_available()
    if reason is not None:
        raise ModelError(f"the TensorRT engine cannot run here: {reason}")
    report = meta.get("metrics", {}).get("export", {}).get("tensorrt")
    profiles = report.get("profiles") if isinstance(report, dict) else None
    batches = tuple(p["batch"][1] for p in profiles) if profiles else TENSORRT_BATCHES
    runner = export.TensorRTRunner(bundle_dir / name, batches)
    return runner, {"kind": "tensorrt", "file": name, "provider": "TensorRT", "providers": ["TensorRT"]}


def open_runtime(
    bundle_dir: Path, meta: dict, runtime: str, threads: int, solo: bool = True, cache_dir: Path | None = None
) -> tuple[Callable, dict]:
    """The ``run(clips) -> scores`` function for ``runtime`` and a description of what it uses
    (``solo``: one-person clips through the bundle's one-person graph, with the fp32 model;
    ``cache_dir``: ONNX Runtime's TensorRT provider's caches)."""
    if runtime in ("fp32", "int8"):
        return _onnx(bundle_dir, meta, runtime, threads, solo, cache_dir)
    if runtime == "tensorrt":
        return _tensorrt(bundle_dir, meta)
    if meta["files"].get("tensorrt") and export.tensorrt_available() is None:
        try:
            run, info = _tensorrt(bundle_dir, meta)
            run(np.zeros((1, 3, meta["input"]["window"], NUM_JOINTS, MAX_PERSONS), np.float32))
            return run, info
        except Exception as exc:  # an engine built for another GPU or TensorRT version, or that
            # loads but cannot run the service's clips: fall back
            run, info = _onnx(bundle_dir, meta, "fp32", threads, solo, cache_dir)
            return run, {**info, "tensorrt_skipped": str(exc)}
    return _onnx(bundle_dir, meta, "fp32", threads, solo, cache_dir)


def self_test(run: Callable[[np.ndarray], np.ndarray], window: int, classes: int, where: Path) -> None:
    """Score two clips of the size the service sends (``window`` frames), one with and one without a
    second person, so both graphs run: a bundle whose files disagree (a label map of another model,
    a one-person graph of another window) is refused at load, not a 500 on every request."""
    clips = np.zeros((2, 3, window, 25, 2), np.float32)
    clips[:, 1, :, :, 0] = np.linspace(-0.5, 0.5, 25, dtype=np.float32)  # someone standing, 1 m tall
    clips[1, :, :, :, 1] = clips[1, :, :, :, 0] + np.float32(0.8)
    try:
        scores = np.asarray(run(clips))
    except Exception as exc:  # ONNX Runtime / TensorRT raise their own kinds
        raise ModelError(f"{where}: the model fails on a {window}-frame clip: {exc}") from None
    if scores.shape != (2, classes):
        raise ModelError(
            f"{where}: the model scores two {window}-frame clips as {scores.shape}, not (2, {classes}): "
            f"one score per label of labels.json"
        )
    if not np.isfinite(scores).all():
        raise ModelError(f"{where}: the model's scores of a {window}-frame clip are not finite")


def load(settings: Settings) -> LoadedModel:
    """Verify and open the model ``settings`` point to; raises :class:`ModelError` or
    :class:`stages.bundle.BundleError` with the reason."""
    cleanup = contextlib.ExitStack()
    try:
        if settings.model_uri:
            tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ntu-serve-")))
            bundle_dir, source = download(settings.model_uri, tmp), settings.model_uri
        else:
            bundle_dir, source = Path(settings.bundle_dir), str(settings.bundle_dir)
        meta = bundle.verify(bundle_dir)
        try:
            loader = from_mapping("loader", LoaderParams, meta["sampling"])
        except (ParamsError, KeyError, TypeError) as exc:
            raise ModelError(f"{bundle_dir}: bundle.json sampling is not a loader section ({exc})") from None
        normalisation = meta.get("normalisation", {})
        if not isinstance(normalisation, dict):
            raise ModelError(f"{bundle_dir}: bundle.json normalisation is not an object")
        view_align = bool(normalisation.get("view_align", False))
        denoise = normalisation.get("denoise", COMPLETE)  # absent: the default mode
        if denoise not in DENOISE_MODES:
            raise ModelError(
                f"{bundle_dir}: bundle.json normalisation.denoise is {denoise!r}, not one of {DENOISE_MODES}"
            )
        cores = usable_cpus()
        workers = settings.workers or (cores if ort_providers()[0] == "CPUExecutionProvider" else 1)
        threads = settings.threads or max(1, cores // workers)
        run, info = open_runtime(
            bundle_dir, meta, settings.runtime, threads, settings.solo, Path(settings.tensorrt_cache_dir)
        )
        self_test(run, loader.window, len(meta["labels"]), bundle_dir)
    except BaseException:
        cleanup.close()
        raise
    if info["kind"] == "tensorrt":  # one CUDA context and stream: not safe from several threads
        workers, threads = 1, 0
    info = {**info, "threads": threads, "workers": workers}
    return LoadedModel(meta, loader, view_align, run, info, source, workers, cleanup, denoise)
