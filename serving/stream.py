"""``WS /v1/stream``: frames in, a prediction every ``stream_stride`` frames out.

Protocol (JSON text or binary messages; one JSON object each):

client -> server
    ``{"frame": [[x, y, z] x 25]}``                      one person's 25 joints, metres, camera space
    ``{"frame": [[[x, y, z] x 25], [[x, y, z] x 25]]}``  two persons
    ``{"reset": true}``                                  forget the window (answered ``{"type": "reset"}``)

server -> client
    ``{"type": "prediction", "frame": n, "window": w, "top": [...], "probabilities": [...],
    "scores": [...], "frames": w, "clips": k, "inference_ms": ..., "latency_ms": ...}``
        after frame ``n`` (counted since the connection opened or the last reset) once the window is
        full (``w = stream_window`` frames, the most recent ones), then every ``stream_stride``
        frames: after frames ``W, W + S, W + 2S, ...``. ``latency_ms`` runs from the arrival of frame
        ``n`` to the sending of its prediction (validation, preprocessing, queueing, inference).
    ``{"type": "error", "code": "...", "detail": "..."}``
        a message that is not JSON, not one of the forms above, a frame of the wrong shape, with NaN,
        infinite or out-of-range values, or with every joint zero (no body: the pipeline drops such
        frames too), or a message over ``max_message_bytes`` (in UTF-8 bytes). The frame is not
        added; the connection stays open and usable.
    ``{"type": "reset", "frame": 0}``

Nothing is sent for a frame that completes no prediction. The window is the last ``stream_window``
frames; it is normalised and sampled exactly like a clip sent to ``POST /v1/predict``, so a full
window predicts what ``/v1/predict`` would for the same frames.

Authentication, when an API key is set: the ``X-API-Key`` header or the ``api_key`` query parameter
(for browsers, which cannot set headers on a WebSocket; query strings can end up in access logs, so
prefer the header). Without it the handshake is refused: an HTTP 401 ``{"detail", "code"}`` where the
server supports WebSocket denial responses, else a close with code 1008. While no model is loaded:
503, or close code 1013.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from models.skeleton import MAX_PERSONS, NUM_JOINTS
from stages.errors import RejectedInput
from stages.preprocess import ClipLimits, joints_from_clip

from .errors import error_response
from .schemas import StreamMessage, describe_errors, frame_has_persons
from .service import Service, key_matches

log = logging.getLogger("serving")
router = APIRouter()


class StreamSession:
    """One connection's sliding window of validated frames, as sent: ``(MAX_PERSONS, 25, 3)``."""

    def __init__(self, service: Service):
        self.service = service
        s = service.settings
        self.size, self.stride, self.max_bytes = s.stream_window, s.stream_stride, s.max_message_bytes
        self.limits = ClipLimits(min_frames=1, max_frames=1, max_abs=service.limits.max_abs)
        self.window_limits = ClipLimits(min_frames=1, max_frames=self.size, max_abs=service.limits.max_abs)
        self.window: deque[np.ndarray] = deque(maxlen=self.size)
        self.seen = 0

    def frame(self, frame: list) -> np.ndarray:
        """A client frame ``(25, 3)`` or ``(M, 25, 3)``, checked like a one-frame clip, -> float32
        ``(MAX_PERSONS, 25, 3)`` in the client's slots (absent persons zero). The slots are kept as
        sent: which body is actor 1 is decided over the whole window, as for a clip (a frame whose
        first slot is empty is not a window whose first slot is empty)."""
        persons = frame if frame_has_persons(frame) else [frame]
        joints_from_clip([[person] for person in persons], self.limits)  # raises on a bad frame
        out = np.zeros((MAX_PERSONS, NUM_JOINTS, 3), dtype=np.float32)
        out[: len(persons)] = np.asarray(persons, dtype=np.float32)
        return out

    def window_joints(self) -> np.ndarray:
        """The window as ``/v1/predict`` takes the same frames: ``(3, T, 25, 2)``."""
        return joints_from_clip(np.stack(self.window, axis=1), self.window_limits)

    async def on_message(self, raw: str | bytes, received: float) -> dict | None:
        """The reply to one message (None: nothing to say yet); raises RejectedInput when it is bad."""
        size = len(raw.encode()) if isinstance(raw, str) else len(raw)  # a text message's characters
        if size > self.max_bytes:  # are up to 4 bytes each
            raise RejectedInput("too_large", f"the message has {size} bytes; at most {self.max_bytes}")
        try:
            message = StreamMessage.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)
            raise RejectedInput("bad_message", describe_errors(errors)) from None
        if message.reset:
            if message.frame is not None:
                raise RejectedInput("bad_message", 'send {"reset": true} and a frame as two messages')
            self.window.clear()
            self.seen = 0
            return {"type": "reset", "frame": 0}
        if message.frame is None:
            raise RejectedInput("bad_message", 'send {"frame": [[x, y, z] x 25]} or {"reset": true}')
        self.window.append(self.frame(message.frame))
        self.seen += 1
        if len(self.window) < self.size or (self.seen - self.size) % self.stride:
            return None
        joints = self.window_joints()  # 3, T, 25, 2
        clips = await run_in_threadpool(self.service.prepare_joints, joints)
        (prediction,) = await self.service.predict([clips], [len(self.window)])
        latency_ms = round((time.perf_counter() - received) * 1000, 3)
        head = {"type": "prediction", "frame": self.seen, "window": len(self.window)}
        return {**head, **prediction.model_dump(), "latency_ms": latency_ms}


async def _refuse(websocket: WebSocket, status: int, code: str, detail: str) -> None:
    """Refuse the handshake: an HTTP error response where the server can send one, else a close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, code, detail))
    else:
        reason = detail.encode()[:123].decode(errors="ignore")  # a close reason holds 123 bytes at most
        await websocket.close(code=1008 if status == 401 else 1013, reason=reason)


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    metrics = service.metrics.stream
    key = websocket.headers.get("x-api-key") or websocket.query_params.get("api_key")
    if not key_matches(key, service.settings.api_key):
        await _refuse(
            websocket, 401, "unauthorized", "missing or wrong X-API-Key header (or api_key parameter)"
        )
        return
    if service.model is None:
        await _refuse(websocket, 503, "not_ready", service.reason)
        return
    await websocket.accept()
    session = StreamSession(service)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            received = time.perf_counter()
            raw = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
            try:
                reply = await session.on_message(raw, received)
            except RejectedInput as exc:
                reply = {"type": "error", "code": exc.code, "detail": exc.message}
            except HTTPException as exc:  # 503 while the server stops
                reply = {"type": "error", "code": getattr(exc, "code", "error"), "detail": str(exc.detail)}
            except Exception as exc:  # a bug: say so and keep the connection
                log.exception("stream message failed")
                reply = {
                    "type": "error",
                    "code": "internal",
                    "detail": f"internal error ({type(exc).__name__})",
                }
            metrics.labels("message").inc()
            if reply is not None:
                metrics.labels(reply["type"]).inc()
                await websocket.send_json(reply)
    except WebSocketDisconnect:
        return
