"""Request-size limits, enforced before the app reads a body.

A declared ``Content-Length`` above the limit is answered 413 at once, without reading the body; a
body that arrives without one (chunked) or longer than it declared is counted as it streams in and
stopped with the same 413 as soon as it passes the limit. The ``.skeleton`` upload route gets
``max_upload_bytes``, the video upload route ``max_video_bytes``, every other route ``max_body_bytes``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_response

UPLOAD_PATH = "/v1/predict/file"
VIDEO_PATH = "/v1/predict/video"


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "too_large", f"the request body is larger than {limit} bytes, the limit here")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int, max_video_bytes: int = 0):
        self.app, self.max_body, self.max_upload = app, max_body_bytes, max_upload_bytes
        self.max_video = max_video_bytes or max_upload_bytes

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
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # an HTTPException: FastAPI answers it with the 413 body
            return message

        await self.app(scope, counted, send)
