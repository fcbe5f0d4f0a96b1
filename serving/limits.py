"""Request-size and body-time limits, enforced before the app reads a body.

A declared ``Content-Length`` above the limit is answered 413 at once, without reading the body; a
body that arrives without one (chunked) or longer than it declared is counted as it streams in and
stopped with the same 413 as soon as it passes the limit. The ``.skeleton`` upload route gets
``max_upload_bytes``, the video upload route ``max_video_bytes``, every other route ``max_body_bytes``.

A client that stops sending its body for ``body_timeout_s`` (before the first part or between two)
is answered 408: uvicorn waits for a body for ever, so without it a connection that sends headers
and a few bytes (a slow-client attack, or a phone that lost its network mid-upload) would hold its
request, and an upload's temporary file, open. Once the body is complete, waiting for the client
(a disconnect, during a long video analysis) has no limit.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

UPLOAD_PATH = "/v1/predict/file"
VIDEO_PATH = "/v1/predict/video"


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "too_large", f"the request body is larger than {limit} bytes, the limit here")


class BodyTimeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(
            408,
            "body_timeout",
            f"the request body stopped arriving: nothing for {seconds:g} s (body_timeout_s)",
        )


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_upload_bytes: int,
        max_video_bytes: int = 0,
        body_timeout_s: float = 30.0,
    ):
        self.app, self.max_body, self.max_upload = app, max_body_bytes, max_upload_bytes
        self.max_video = max_video_bytes or max_upload_bytes
        self.body_timeout = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = {UPLOAD_PATH: self.max_upload, VIDEO_PATH: self.max_video}.get(scope["path"], self.max_body)
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            text = declared[0].decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()):
                response = error_response(400, "bad_request", f"Content-Length {text!r} is not a byte count")
                await response(scope, receive, send)
                return
            if int(text) > limit:
                await error_response(413, "too_large", BodyTooLarge(limit).detail)(scope, receive, send)
                return
        received, complete = 0, False

        async def counted() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what is left to wait for is the client going away
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None  # FastAPI answers it with the 408 body
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(limit)  # an HTTPException: FastAPI answers it with the 413 body
            return message

        await self.app(scope, counted, send)
