"""``POST /v1/predict`` with an ``.npy`` clip, answered in front of FastAPI's routing.

The service's hot path: a client streaming clips from a sensor or a loader sends them as ``.npy``
bodies. For those requests FastAPI's work (the middleware stack it adds, matching the route,
solving the dependencies) took 0.15 ms of the 0.58 ms a request cost the service with an instant
model, on a 2-core AMD EPYC: with the default model (a 4.1-4.7 ms call) the median latency at one
client was +22% to +25% over the model call through FastAPI against +16% to +18% through this lane,
measured alternately (``benchmarks/serve_load.py``; README, "Serving").

The lane answers exactly what :func:`serving.routes.predict` would, with the same code: the API key
(:func:`~serving.routes.check_api_key`), the model's readiness, the body (through the size and time
limits of :class:`~serving.limits.BodyLimitMiddleware`, which wraps the lane), the clip
(:func:`~serving.routes.predict_npy`) and every refusal's ``{"detail", "code"}`` body
(:mod:`serving.errors`). Anything else (another path, method or content type) goes on to FastAPI,
and the route keeps its ``.npy`` branch (and the OpenAPI description of both bodies).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from stages.errors import RejectedInput

from . import errors
from .routes import API_KEY_HEADER, check_api_key, media_type, predict_npy
from .schemas import NPY_MEDIA_TYPE
from .service import Service

PREDICT_PATH = "/v1/predict"
_KEY_HEADER = API_KEY_HEADER.lower().encode("latin-1")


class NpyPredictLane:
    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["path"] == PREDICT_PATH
            and scope["method"] == "POST"
            and media_type(_header(scope, b"content-type") or "") == NPY_MEDIA_TYPE
        ):
            await self.app(scope, receive, send)
            return
        try:
            response = await self._predict(scope, receive)
        except HTTPException as exc:  # ApiError included: 401, 503, 413, 408, 422 (a bad body)
            response = errors.http_error(exc)
        except RejectedInput as exc:  # a bad clip
            response = errors.rejected(exc)
        except ClientDisconnect:
            response = errors.disconnected()
        await response(scope, receive, send)

    async def _predict(self, scope: Scope, receive: Receive) -> Response:
        service = self.service
        if service.settings.api_key is not None:
            check_api_key(service, _header(scope, _KEY_HEADER))
        service.require()  # 503 with the reason while no model is loaded
        return await predict_npy(service, await _body(receive))


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of the header ``name`` (lower case), as Starlette decodes it."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _body(receive: Receive) -> bytes:
    """The whole request body, as ``Request.body()`` reads it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
