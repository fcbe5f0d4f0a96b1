"""The FastAPI app: ``uvicorn serving.app:app`` (or ``python -m serving``), ``create_app(settings)`` in tests.

The model is loaded in the lifespan (:class:`serving.service.Service`) from the checksummed bundle
(``NTU_SERVE_BUNDLE_DIR``) or the MLflow registry (``NTU_SERVE_MODEL_URI``); when that fails the app
still starts, /health answers and /ready and /v1/* answer 503 with the reason. The pose estimator
for ``/v1/predict/video`` (``NTU_SERVE_POSE_DIR``, the export_pose stage's output) is loaded beside it;
without it only that endpoint answers 503. Endpoints: :mod:`serving.routes` (HTTP; ``.npy`` clips
to ``/v1/predict`` are answered in front of the routing by :mod:`serving.fastlane`) and
:mod:`serving.stream` (the WebSocket protocol); settings: :mod:`serving.settings`; every error is
``{"detail": "...", "code": "..."}`` (:mod:`serving.errors`).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security
from starlette.middleware import Middleware

from . import errors, routes, stream
from .activity import ActivityMiddleware, ClientActivity
from .fastlane import NpyPredictLane
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .schemas import ErrorBody
from .service import Service
from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app serving the model ``settings`` (default: from the environment) point to."""
    settings = settings or Settings()
    metrics = Metrics()
    activity = ClientActivity()  # which requests are alone (serving/activity.py)
    service = Service(settings, metrics, activity)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        # the schema (36 ms to build) is read by the metrics middleware for the first request that no
        # route records (an .npy clip, answered by the lane): built here, not on that request
        app.openapi()
        # The 230,000 objects of the imports and the model (torch, FastAPI, pydantic, ONNX) go to
        # the collector's permanent generation: a full collection traversed them all, 70-85 ms with
        # the event loop stopped, and the 2,100 lists of a 3-second JSON clip brought one about
        # every 190 requests (p99 at 32 clients 204-221 ms against 114-124 ms frozen;
        # benchmarks/serve_load.py).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await service.stop()

    app = FastAPI(
        title="NTU RGB+D action recognition",
        summary="Skeleton clips in, action classes out (the pipeline's exported CTR-GCN ensemble).",
        version="1",
        lifespan=lifespan,
        middleware=[  # outermost first: the metrics also count the size refusals
            Middleware(ActivityMiddleware, activity=activity),
            Middleware(MetricsMiddleware, metrics=metrics),
            Middleware(
                BodyLimitMiddleware,
                max_body_bytes=settings.max_body_bytes,
                max_upload_bytes=settings.max_upload_bytes,
                max_video_bytes=settings.max_video_bytes,
                body_timeout_s=settings.body_timeout_s,
            ),
            Middleware(NpyPredictLane, service=service),  # .npy clips to /v1/predict, before routing
        ],
    )
    app.state.service = service
    errors.install(app)
    app.include_router(routes.router)
    if settings.api_key is not None:
        app.include_router(
            routes.v1,
            dependencies=[Security(routes.require_api_key)],
            responses={401: {"model": ErrorBody}},
        )
    else:
        app.include_router(routes.v1)
    app.include_router(stream.router)
    return app


app = create_app()
