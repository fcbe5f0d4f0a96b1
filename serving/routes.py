"""The HTTP endpoints.

Open: ``GET /health`` (the process is alive), ``GET /ready`` (a model is loaded; 503 with the reason
otherwise), ``GET /metrics`` (Prometheus).

``/v1`` (the API key, when one is set, in ``X-API-Key``; 503 with the reason while no model is loaded):

- ``GET /v1/model``: name, version, classes, input spec and limits, metrics, runtime and provider;
- ``POST /v1/predict``: ``{"clip": (T, 25, 3) or (M, T, 25, 3)}`` -> the top-k classes, every class's
  probability and score, and the inference time;
- ``POST /v1/predict/batch``: ``{"clips": [...]}`` (at most ``max_batch``), one model call; each clip
  is validated on its own and gets its own entry in ``results``, a prediction or an error (the
  request itself succeeds; a bad clip does not cost the good ones their answer);
- ``POST /v1/predict/file``: a raw NTU ``.skeleton`` file as the multipart field ``file``, parsed and
  denoised by the parse stage's code; a malformed file gets the parser's reason.
- ``POST /v1/predict/video``: a video (``.avi``, ``.mp4`` / ``.mov`` / ``.3gp``, ``.webm`` / ``.mkv``) as the
  multipart field ``file``: the pose estimator finds and tracks up to two people
  (:mod:`serving.video`), and the video action model (``video_bundle_dir``: the action model
  fine-tuned on the estimator's skeletons; the clip model when there is no such bundle) names
  their action per window of ``video_window`` frames;
  ``skeletons=true`` (query or form field) adds the tracked skeletons. 503 ``no_pose_model`` while no
  pose export is loaded (the other routes still work), and 503 ``no_video_model`` when the configured
  video bundle failed verification; an unreadable video, a video too short or too long, or one with
  nobody in it get 422.

JSON bodies must be sent as ``application/json`` (415 otherwise); ``NaN``/``Infinity`` literals are
read, and refused as ``not_finite`` with the place of the first one.
"""

from __future__ import annotations

import time
from typing import Annotated, TypeVar

import anyio.to_thread
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.skeleton import MAX_PERSONS
from stages.errors import RejectedInput

from . import video, video_actions, video_io
from .errors import ApiError
from .model import LoadedModel
from .schemas import (
    NPY_MEDIA_TYPE,
    BatchItem,
    BatchRequest,
    BatchResponse,
    ErrorBody,
    Health,
    ModelInfo,
    ModelRef,
    PoseRef,
    PredictRequest,
    PredictResponse,
    Ready,
    VideoResponse,
    VideoSkeletons,
    VideoTiming,
    VideoWindow,
    batch_clip,
    describe_errors,
    npy_clip,
    plain_clip,
)
from .service import Service, key_matches

Body = TypeVar("Body", bound=BaseModel)

# A JSON clip body at most this long is read and prepared on the event loop (1.1 ms at this size on
# a 2-core Xeon, about what the largest .npy clip takes), a longer one in a worker thread, so that a
# big body does not hold the loop. See ``predict``.
INLINE_JSON_BYTES = 128 * 1024

API_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's NTU_SERVE_API_KEY")


# The dependencies are ``async def`` although they never wait: FastAPI runs a plain ``def`` dependency
# in its thread pool, which cost every request two thread hand-offs (benchmarks/serve_load.py).
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def ready_model(service: Annotated[Service, Depends(get_service)]) -> LoadedModel:
    return service.require()


async def require_api_key(
    service: Annotated[Service, Depends(get_service)], key: Annotated[str | None, Security(_api_key)]
) -> None:
    """The ``/v1`` guard (installed by ``create_app`` only when a key is configured)."""
    check_api_key(service, key)


def check_api_key(service: Service, key: str | None) -> None:
    """401 unless ``key`` (the request's ``X-API-Key``, None without one) is the configured key."""
    if not key_matches(key, service.settings.api_key):
        raise ApiError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")


Service_ = Annotated[Service, Depends(get_service)]
Model_ = Annotated[LoadedModel, Depends(ready_model)]


def media_type(content_type: str) -> str:
    """A ``Content-Type`` header's media type, lower case, without its parameters."""
    return content_type.split(";")[0].strip().lower()


def _media_type(request: Request) -> str:
    return media_type(request.headers.get("content-type", ""))


async def json_bytes(request: Request, other: str = "", clips: int = 1) -> bytes:
    """The request body: 415 unless it is JSON (``other``: the route's other accepted body, named in
    the message); 422 ``too_long`` unless it can hold ``clips`` clips within the limits."""
    media = _media_type(request)
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send JSON with Content-Type: application/json{other} (got {media or 'none'})",
        )
    body = await request.body()
    check_json_size(body, request.app.state.service.limits.max_frames, clips)
    return body


def check_json_size(body: bytes, max_frames: int, clips: int = 1) -> None:
    """422 ``too_long`` for a JSON body with more values than ``clips`` clips of ``max_frames`` frames
    of two persons hold, told before parsing: the parse holds the GIL, so the event loop and every
    other request with it, whichever thread runs it (1.5 s for 16 MiB of numbers). Nested arrays of
    N numbers have N - 1 commas; counting them takes 0.5 ms per MiB."""
    most = clips * 75 * MAX_PERSONS * max_frames
    values = body.count(b",") + 1
    if values > most:
        raise ApiError(
            422,
            "too_long",
            f"the body holds {values} values; {clips} clip(s) of at most {max_frames} frames of "
            f"{MAX_PERSONS} persons hold at most {most}",
        )


def parse(schema: type[Body], body: bytes) -> Body:
    """``body`` as ``schema``; 422 with the reason unless it fits. Called with the clip's preparation,
    in a worker thread unless the body is short (``INLINE_JSON_BYTES``)."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        code = "invalid_json" if errors[0]["type"] == "json_invalid" else "invalid_request"
        raise ApiError(422, code, describe_errors(errors)) from None


def _json_schema(schema: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that reads ``schema`` as its JSON body itself."""
    body = schema.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}


_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            }
        },
    }
}
_VIDEO_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "an .avi, .mp4 / .mov / .3gp or .webm / .mkv video",
                        },
                        "skeletons": {"type": "boolean", "description": "include the skeletons"},
                    },
                    "required": ["file"],
                }
            }
        },
    }
}
_ERRORS = {status: {"model": ErrorBody} for status in (400, 413, 415, 422, 503)}

router = APIRouter()
v1 = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(ready_model)])  # 503 without a model


def get_and_head(on: APIRouter, path: str, **kwargs):
    """``GET path``, and ``HEAD path`` too (HTTP says so; some health checkers send it; FastAPI
    answers HEAD only where a route lists it). HEAD is its own route, left out of the OpenAPI
    schema: one route for both methods gave both operations one ``operationId``, which OpenAPI
    requires to be unique (client generators refuse such a schema)."""

    def register(endpoint):
        on.api_route(path, methods=["HEAD"], include_in_schema=False, **kwargs)(endpoint)
        return on.get(path, **kwargs)(endpoint)

    return register


@get_and_head(router, "/health", response_model=Health)
async def health() -> Health:
    return Health(status="alive")


@get_and_head(router, "/ready", response_model=Ready, responses={503: {"model": ErrorBody}})
async def ready(service: Service_) -> Ready:
    return Ready(ready=True, model=service.ref)


@get_and_head(
    router, "/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}}
)
async def metrics(service: Service_) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@get_and_head(v1, "/model", response_model=ModelInfo)
async def model_info(service: Service_, model: Model_) -> ModelInfo:
    meta, s, limits = model.meta, service.settings, service.limits
    return ModelInfo(
        name=meta["name"],
        version=meta["version"],
        benchmark=meta["benchmark"],
        streams=meta["streams"],
        fusion=meta["fusion"],
        normalisation={**meta.get("normalisation", {}), "denoise": model.denoise},
        sampling=meta["sampling"],
        classes=model.labels,
        input={
            **meta["input"],
            # the bundle's min_frames is the exported graph's; clips are resized to its window
            **({"graph_min_frames": meta["input"]["min_frames"]} if "min_frames" in meta["input"] else {}),
            "clip": "(T, 25, 3) for one person or (M, T, 25, 3), M <= 2; x, y, z in metres, camera space",
            "min_frames": limits.min_frames,
            "max_frames": limits.max_frames,
            "max_abs_metres": limits.max_abs,
            "max_batch": s.max_batch,
        },
        metrics=meta.get("metrics", {}),
        runtime={
            **model.runtime,
            "micro_batching": service.micro_batching,
            "max_batch_size": s.max_batch_size,
            "video": {
                **(service.pose.describe() if service.pose else {"unavailable": service.pose_reason}),
                "action_model": service.describe_video_model(),
            },
        },
        source=model.source,
    )


_PREDICT_BODY = _json_schema(PredictRequest)
_PREDICT_BODY["requestBody"]["content"][NPY_MEDIA_TYPE] = {
    "schema": {"type": "string", "format": "binary", "description": "the clip array as np.save writes it"}
}


def answer(service: Service, prediction: dict) -> Response:
    """A ``PredictResponse`` as JSON, written directly from the prediction's plain data.

    Building the pydantic models and letting FastAPI validate and serialise them again was
    measurable at one client: with the faster ``.npy`` header (``schemas.npy_header``) this took the
    latency from +45-47% to +39-40% over the model call (benchmarks/serve_load.py, A/B). The fields
    and their order are those of :class:`~serving.schemas.PredictResponse` (tests check the answers
    against it).
    """
    meta = service.require().meta
    body = {**prediction, "model": {"name": meta["name"], "version": meta["version"]}}
    return Response(orjson.dumps(body), media_type="application/json")


@v1.post("/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY)
async def predict(request: Request, service: Service_) -> Response:
    if _media_type(request) == NPY_MEDIA_TYPE:  # in create_app's app, serving.fastlane answers these
        return await predict_npy(service, await request.body())
    body = await json_bytes(request, f" (or {NPY_MEDIA_TYPE}: the clip array as np.save writes it)")

    def prepare() -> tuple[np.ndarray, int]:  # a bad body or clip: 422 (ApiError, ClipError)
        clip = plain_clip(body)  # None: not plain numbers; pydantic reads it and says what is wrong
        return service.prepare_clip(parse(PredictRequest, body).clip if clip is None else clip)

    # for the reason predict_npy gives, a short body is parsed on the event loop (+18% requests/s
    # at 32 clients for a 56 KiB clip), a long one in a worker thread
    prediction = await service.predict_prepared(prepare, on_loop=len(body) <= INLINE_JSON_BYTES)
    return answer(service, prediction)


async def predict_npy(service: Service, body: bytes) -> Response:
    """``POST /v1/predict``'s answer to an ``.npy`` clip ``body``.

    Prepared on the event loop: no parsing, and bounded by the clip limits (0.1 ms for a 84-frame
    clip, 1.2 ms for the largest, 2 x 1200 frames of float64). In a worker thread the same work cost
    the service 9-11% of its requests/s at 32 clients: its many small NumPy calls pass the GIL back
    and forth with the event loop, busy under load (benchmarks/serve_load.py). A bad body or clip:
    422 (ClipError).
    """
    prediction = await service.predict_prepared(lambda: service.prepare_clip(npy_clip(body)), on_loop=True)
    return answer(service, prediction)


def _prepare_all(service: Service, clips: list) -> list:
    limit = service.settings.max_batch
    if len(clips) > limit:
        raise ApiError(422, "too_many", f"{len(clips)} clips in one request; at most {limit}")
    out = []
    for i in range(len(clips)):
        try:
            out.append(service.prepare_clip(batch_clip(clips, i)))
        except RejectedInput as exc:
            out.append(exc)
    return out


@v1.post("/predict/batch", response_model=BatchResponse, openapi_extra=_json_schema(BatchRequest))
async def predict_batch(request: Request, service: Service_) -> BatchResponse:
    body = await json_bytes(request, clips=service.settings.max_batch)
    prepared = await run_in_threadpool(lambda: _prepare_all(service, parse(BatchRequest, body).clips))
    good = [p for p in prepared if not isinstance(p, RejectedInput)]  # (clips, frames) pairs
    predictions = iter(await service.predict([c for c, _ in good], [n for _, n in good]) if good else [])
    results = [
        BatchItem(index=i, error=ErrorBody(detail=p.message, code=p.code))
        if isinstance(p, RejectedInput)
        else BatchItem(index=i, prediction=next(predictions))
        for i, p in enumerate(prepared)
    ]
    return BatchResponse(model=service.ref, results=results)


@v1.post("/predict/file", response_model=PredictResponse, openapi_extra=_UPLOAD)
async def predict_file(request: Request, service: Service_) -> Response:
    if _media_type(request) != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "upload the .skeleton file as multipart/form-data, field 'file'"
        )
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422,
                "missing_file",
                "no file in the multipart field 'file' (the .skeleton file; a body cut short before its "
                "closing boundary has none)",
            )
        data = await upload.read()
    prediction = await service.predict_prepared(lambda: service.prepare_file(data))  # RejectedInput -> 422
    return answer(service, prediction)


def _flag(value) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on")


def _skeletons(skeleton: video.VideoSkeleton) -> VideoSkeletons:
    return VideoSkeletons(
        joints=np.round(skeleton.joints, 5).tolist(),
        joints2d=np.round(skeleton.joints2d, 2).tolist(),
        confidence=np.round(skeleton.confidence, 4).tolist(),
        boxes=np.round(skeleton.boxes, 2).tolist(),
        scores=np.round(skeleton.scores, 4).tolist(),
    )


def _video_content(upload: UploadFile) -> bool:
    """Whether an upload that names no video container (``curl -F file=@clip``: no suffix,
    ``application/octet-stream``) starts as one (:func:`serving.video_io.sniff_container`)."""
    head = upload.file.read(16)
    upload.file.seek(0)
    return video_io.sniff_container(head) is not None


@v1.post("/predict/video", response_model=VideoResponse, openapi_extra=_VIDEO_UPLOAD)
async def predict_video(request: Request, service: Service_, skeletons: bool = False) -> VideoResponse:
    pose = service.require_pose()  # 503 no_pose_model without the pose export
    action_model, predictor = service.require_video_model()  # 503 when a video bundle was refused
    if _media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "upload the video as multipart/form-data, field 'file'")
    options = video.VideoOptions.from_settings(service.settings)
    received = time.perf_counter()
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422,
                "missing_file",
                f"no file in the multipart field 'file' ({video_io.KINDS}; a body cut short before "
                "its closing boundary has none)",
            )
        skeletons = skeletons or _flag(form.get("skeletons"))
        named = video_io.upload_suffix(upload.filename, upload.content_type) is not None
        if not named and not _video_content(upload):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"upload {video_io.KINDS}: {' '.join(video_io.VIDEO_SUFFIXES)} "
                f"(got {upload.filename!r}, {upload.content_type or 'no type'})",
            )
        started = time.perf_counter()  # the upload is in (a temporary file)
        info, skeleton = await anyio.to_thread.run_sync(  # VideoError -> 422
            video.skeleton_from_upload, upload.file, pose, options, limiter=service.video_limiter
        )
    pose_ms = (time.perf_counter() - started) * 1000
    inputs = await run_in_threadpool(
        video_actions.window_clips, skeleton.joints, action_model, options.window, options.stride
    )
    scored = await service.predict_with(predictor, inputs.prepared, inputs.counts, action_model.labels)
    predictions = inputs.choose(scored)
    actions_ms = (time.perf_counter() - started) * 1000 - pose_ms
    total_ms = (time.perf_counter() - received) * 1000
    return VideoResponse(
        model=ModelRef(name=action_model.meta["name"], version=action_model.meta["version"]),
        pose_model=PoseRef(version=pose.version, provider=pose.provider),
        frames=skeleton.frames,
        fps=round(info.fps, 3),
        declared_frames=info.declared_frames,
        decoded_frames=info.read.decoded,
        unreadable_frames=info.read.unreadable,
        analysed_fps=round(info.analysed_fps, 3),
        width=info.width,
        height=info.height,
        people=skeleton.people,
        frames_with_people=skeleton.frames_with_people,
        windows=[
            VideoWindow(start=start, end=end, prediction=p)
            for (start, end), p in zip(inputs.spans, predictions, strict=True)
        ],
        timing=VideoTiming(
            pose_ms=round(pose_ms, 1),
            actions_ms=round(actions_ms, 1),
            total_ms=round(total_ms, 1),
            pose_frames_per_s=round(skeleton.frames / max(pose_ms / 1000, 1e-9), 2),
        ),
        skeletons=_skeletons(skeleton) if skeletons else None,
    )
