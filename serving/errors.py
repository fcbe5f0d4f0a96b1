"""One error shape for every failure: ``{"detail": "...", "code": "..."}``.

- :class:`ApiError` (an ``HTTPException`` with a ``code``) for what the server refuses;
- :class:`~stages.errors.RejectedInput` from the pipeline's input path (a bad clip, a malformed
  ``.skeleton`` file) -> 422 with its code and message;
- FastAPI's validation errors -> 422 ``invalid_request`` with a one-line description;
- a client that hangs up before its body is in (Starlette's ``ClientDisconnect``) -> 400
  ``client_disconnected``, which nobody reads, but the log and the metrics do not call it a 500;
- anything else -> 500 ``internal`` (a bug; the traceback goes to the log, not the client).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from stages.errors import RejectedInput

from .schemas import describe_errors

CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "not_ready",
}


class ApiError(HTTPException):
    """A refusal with a status, a stable ``code`` and a ``detail`` that says what to do."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.code = code


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def http_error(exc: HTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


def rejected(exc: RejectedInput) -> JSONResponse:
    return error_response(422, exc.code, exc.message)


def disconnected() -> JSONResponse:
    return error_response(
        400, "client_disconnected", "the client closed the connection before its request body was complete"
    )


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return http_error(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", describe_errors(exc.errors()))


async def _rejected(request: Request, exc: RejectedInput) -> JSONResponse:
    return rejected(exc)


async def _disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
    return disconnected()


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so the server logs the traceback.
    return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the ``{"detail", "code"}`` shape."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RejectedInput, _rejected)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(Exception, _internal)
