"""The served state of one app: the model (or why there is none), its predictor, the clip path, and
the pose estimator of the video path (or why there is none).

Every input goes through :mod:`stages.preprocess`, the pipeline's own validation, normalisation and
test-time sampling, and the scores of a sample's clips are combined as the evaluate stage combines
them (:func:`stages.training.average_clips`), so a clip gets the scores evaluate would give it.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import anyio
import numpy as np
import torch
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool

from stages import preprocess
from stages.training import average_clips

from . import model as model_loader
from .activity import CONNECTION, ClientActivity
from .batching import MicroBatcher, Predictor, Prepare
from .errors import ApiError
from .metrics import Metrics
from .model import LoadedModel
from .pose_runtime import PoseRuntime
from .schemas import ModelRef, Prediction
from .settings import Settings

log = logging.getLogger("serving")


def key_matches(given: str | None, expected: SecretStr | None) -> bool:
    """True when no key is configured, or ``given`` equals it (constant-time comparison)."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


class Service:
    """Loaded in the app's lifespan (:meth:`start`); the routes read it from ``app.state.service``."""

    def __init__(self, settings: Settings, metrics: Metrics, activity: ClientActivity | None = None):
        self.settings, self.metrics = settings, metrics
        # the requests and streams the app's ActivityMiddleware records: who is alone (activity.py)
        self.activity = activity if activity is not None else ClientActivity()
        self.limits = preprocess.ClipLimits(max_frames=settings.max_frames)
        self.model: LoadedModel | None = None
        self.reason = "the model is still loading"
        self.predictor: Predictor | None = None
        self.micro_batching = False  # decided when the model is loaded (settings, else its device)
        self.pose: PoseRuntime | None = None  # the video endpoint's pose estimator (optional)
        self.pose_reason = "the pose model is still loading"
        self.video_limiter: anyio.CapacityLimiter | None = None
        # the video path's action model (settings.video_bundle_dir); None: videos get the clip model,
        # unless video_model_error says why the configured one is refused
        self.video_model: LoadedModel | None = None
        self.video_predictor: Predictor | None = None
        self.video_model_error: str | None = None

    async def start(self) -> None:
        """Load the models; on failure keep serving /health and answer 503 with the reason."""
        await self._start_pose()
        try:
            self.model = await run_in_threadpool(model_loader.load, self.settings)
        except Exception as exc:  # a missing, tampered or unloadable bundle must not stop the server
            self.reason = f"no model loaded: {exc}"
            log.error("serving: %s", self.reason)
            return
        s = self.settings
        self.micro_batching = s.micro_batching
        if self.micro_batching is None:
            self.micro_batching = self.model.runtime["provider"] != "CPUExecutionProvider"
        if self.micro_batching:
            self.predictor = MicroBatcher(
                self.model.run,
                s.batch_window_ms / 1000,
                s.max_batch_size,
                self.metrics.observe_batch,
                self.model.workers,
            )
        else:
            self.predictor = Predictor(self.model.run, self.metrics.observe_batch, self.model.workers)
        await self.predictor.start()
        await self._start_video_model()
        self.metrics.ready.set(1)
        log.info(
            "serving: %s %s (%s)", self.model.meta["name"], self.model.meta["version"], self.model.runtime
        )

    async def _start_pose(self) -> None:
        """Load the pose export for the video endpoint; without it only that endpoint answers 503."""
        # one video at a time: the pose graphs already use every core (or the GPU) per call
        self.video_limiter = anyio.CapacityLimiter(1)
        try:
            self.pose = await run_in_threadpool(
                PoseRuntime.load, self.settings.pose_dir, self.settings.threads
            )
        except Exception as exc:  # missing or altered export: the skeleton endpoints still work
            self.pose_reason = (
                f"no pose model loaded, so videos cannot be analysed: {exc} "
                f"(set NTU_SERVE_POSE_DIR to the export_pose stage's output)"
            )
            log.warning("serving: %s", self.pose_reason)
            return
        log.info("serving: pose estimator %s", self.pose.describe())

    async def _start_video_model(self) -> None:
        """Load ``video_bundle_dir``'s model for the video endpoint; absent: videos get the clip model."""
        where = self.settings.video_bundle_dir
        if where is None or not Path(where).exists():
            return
        settings = self.settings.model_copy(update={"bundle_dir": Path(where), "model_uri": None})
        try:
            self.video_model = await run_in_threadpool(model_loader.load, settings)
        except Exception as exc:  # tampered or unloadable: only the video endpoint refuses (503)
            self.video_model_error = f"the video model at {where} could not be loaded: {exc}"
            log.error("serving: %s", self.video_model_error)
            return
        model = self.video_model
        self.video_predictor = Predictor(model.run, self.metrics.observe_batch, model.workers)
        await self.video_predictor.start()
        meta = self.video_model.meta
        log.info("serving: video action model %s %s", meta["name"], meta["version"])

    def require_video_model(self) -> tuple[LoadedModel, Predictor]:
        """The action model and predictor for videos: the video bundle's, else the clip model's; 503
        when a configured video bundle was refused."""
        if self.video_model_error is not None:
            raise ApiError(503, "no_video_model", self.video_model_error)
        if self.video_model is not None and self.video_predictor is not None:
            return self.video_model, self.video_predictor
        model = self.require()
        if self.predictor is None:
            raise ApiError(503, "not_ready", self.reason)
        return model, self.predictor

    def describe_video_model(self) -> dict:
        if self.video_model_error is not None:
            return {"unavailable": self.video_model_error}
        if self.video_model is None:
            return {"model": "the clip model", "why": f"no video bundle at {self.settings.video_bundle_dir}"}
        meta = self.video_model.meta
        return {"name": meta["name"], "version": meta["version"], "source": self.video_model.source}

    async def predict_with(
        self, predictor: Predictor, prepared: list[np.ndarray], frames: list[int], labels: list[dict]
    ) -> list[Prediction]:
        """One call of ``predictor`` for the clips of ``prepared`` (one array per sample)."""
        scores, batch = await predictor.predict(np.concatenate(prepared))
        out, start = [], 0
        for clips, n in zip(prepared, frames, strict=True):
            piece = scores[start : start + len(clips)]
            out.append(summarise_scores(piece, labels, self.settings.top_k, n, batch.inference_ms))
            start += len(clips)
        return out

    async def stop(self) -> None:
        self.pose, self.pose_reason = None, "the server has stopped"
        if self.video_predictor is not None:
            await self.video_predictor.stop()
        if self.video_model is not None:
            self.video_model.cleanup.close()
        self.video_model, self.video_predictor = None, None
        self.metrics.ready.set(0)
        if self.predictor is not None:
            await self.predictor.stop()
        if self.model is not None:
            self.model.cleanup.close()
        self.model, self.predictor, self.reason = None, None, "the server has stopped"

    def require(self) -> LoadedModel:
        if self.model is None:
            raise ApiError(503, "not_ready", self.reason)
        return self.model

    @property
    def ref(self) -> ModelRef:
        meta = self.require().meta
        return ModelRef(name=meta["name"], version=meta["version"])

    # -- the clip path ---------------------------------------------------------------------------

    def prepare_clip(self, clip) -> tuple[np.ndarray, int]:
        """A client clip ``(T, 25, 3)`` / ``(M, T, 25, 3)`` -> (model clips ``(K, 3, window, 25, 2)``,
        T); raises :class:`stages.preprocess.ClipError`."""
        joints = preprocess.joints_from_clip(clip, self.limits)
        return self.prepare_joints(joints), joints.shape[1]

    def prepare_joints(self, joints: np.ndarray) -> np.ndarray:
        m = self.require()
        return preprocess.prepare(joints, m.loader, m.view_align)

    def prepare_file(self, data: bytes) -> tuple[np.ndarray, int]:
        """A raw ``.skeleton`` file -> (model clips, frames), parsed, denoised and checked as a clip."""
        m = self.require()
        joints = preprocess.joints_from_skeleton_file(data, m.denoise)  # (3, T, 25, 2), as parse does
        joints = preprocess.joints_from_clip(  # the same limits; every frame kept, as parse keeps it
            joints.transpose(3, 1, 2, 0), self.limits, drop_empty_frames=False
        )
        return self.prepare_joints(joints), joints.shape[1]

    async def predict(self, prepared: list[np.ndarray], frames: list[int]) -> list[Prediction]:
        """One model call for the clips of ``prepared`` (one array per sample), one prediction each."""
        if self.predictor is None:
            raise ApiError(503, "not_ready", self.reason)
        return await self.predict_with(self.predictor, prepared, frames, self.require().labels)

    async def predict_prepared(self, prepare: Prepare, on_loop: bool = False) -> dict:
        """The prediction for one sample (:func:`score_summary`): ``prepare()`` -> ``(clips, frames)``
        (validation and preprocessing, raising :class:`~stages.errors.RejectedInput`), then the model
        call, in one worker thread when requests are not micro-batched.

        ``on_loop``: ``prepare()`` runs on the event loop instead, and only the model call goes to
        a worker (or, for a lone client, runs on the loop too: :mod:`serving.activity`). For a
        preparation that is short and bounded (a ``.npy`` clip's, a short JSON body's) this is
        cheaper: in a worker its many small NumPy calls pass the GIL back and forth with the event
        loop.
        """
        if self.predictor is None:
            raise ApiError(503, "not_ready", self.reason)
        if on_loop:
            clips, frames = prepare()
            inline = self.settings.inline_when_alone and self.activity.alone(CONNECTION.get())
            scores, batch = await self.predictor.predict(clips, inline=inline)
        else:
            (_, frames), scores, batch = await self.predictor.predict_after(prepare)
        return score_summary(scores, self.require().labels, self.settings.top_k, frames, batch.inference_ms)

    # -- the video path (POST /v1/predict/video) ---------------------------------------------------

    def require_pose(self) -> PoseRuntime:
        if self.pose is None:
            raise ApiError(503, "no_pose_model", self.pose_reason)
        return self.pose


def score_summary(
    scores: np.ndarray, labels: list[dict], top_k: int, frames: int, inference_ms: float
) -> dict:
    """The scores ``(K, classes)`` of one sample's K clips -> its prediction as plain data, the fields
    of :class:`~serving.schemas.Prediction`: clip scores combined as evaluate combines them, softmax,
    the ``top_k`` classes. (The predict endpoints write it as JSON directly; see ``routes.answer``.)"""
    k = len(scores)
    fused = scores[0] if k == 1 else average_clips(torch.from_numpy(scores), k)[0].numpy()
    fused = fused.astype(np.float64)
    probs = np.exp(fused - fused.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:top_k]
    return {
        "top": [
            {"index": labels[i]["index"], "id": labels[i]["id"], "name": labels[i]["name"], "probability": p}
            for i, p in zip(top.tolist(), probs[top].tolist(), strict=True)
        ],
        "probabilities": probs.tolist(),
        "scores": fused.tolist(),
        "frames": frames,
        "clips": k,
        "inference_ms": round(inference_ms, 3),
    }


def summarise_scores(
    scores: np.ndarray, labels: list[dict], top_k: int, frames: int, inference_ms: float
) -> Prediction:
    """:func:`score_summary` as a validated :class:`~serving.schemas.Prediction`."""
    return Prediction.model_validate(score_summary(scores, labels, top_k, frames, inference_ms))
