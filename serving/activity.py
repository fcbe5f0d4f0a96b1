"""Whether the request being answered is the only client the service has heard from lately.

With one client, the thread hand-off of its model call (to a worker and back, each side waking a
sleeping thread) is the largest part of what the service adds to the call, and nothing else waits
for the event loop meanwhile: so a one-clip model call of a lone client runs on the event loop
(``Predictor.predict(..., inline=True)``; setting ``inline_when_alone``). At one client this took the
median latency from +19-27% to +15-22% over the server's own model call, lower or equal in each of
eight rounds alternating with the previous server on a 2-core AMD EPYC (``benchmarks/serve_load.py
--clients 1 --body npy``; README, "The service under load").

"Alone" is decided per connection, not per request in flight: with two clients, a call run on the
loop would hold the other client's request unread, so the loop would find nothing in flight and run
that one on the loop too, and the clients would take turns on one core (earlier measurements: 312-375
against 373-407 requests/s at 2 clients). A request is alone when no other connection sent one within
:data:`WINDOW_S` and no WebSocket stream is open; at 2, 8 and 32 clients every call then still goes
to a worker. A client that opens a connection per request is never alone (the previous connections
are seen within the window): it keeps the worker path.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

WINDOW_S = 0.1  # another connection heard from within 100 ms: not alone

ALONE: ContextVar[bool] = ContextVar("ntu_serve_alone", default=False)  # the current request's verdict


class ClientActivity:
    """The connections heard from within :data:`WINDOW_S`, and the WebSocket streams open."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.streams = 0
        self._last: dict[tuple, float] = {}  # connection (host, port) -> when it last sent a request

    def request(self, client, now: float | None = None) -> bool:
        """Note a request of the connection ``client`` (ASGI's ``scope["client"]``); whether it is alone:
        no other connection sent one within the window, and no stream is open. Without a ``client``
        (a server that does not say, a Unix socket) connections cannot be told apart: never alone."""
        now = time.monotonic() if now is None else now
        if client is None:
            return False
        key = tuple(client)
        horizon = now - self.window_s
        alone = self.streams == 0
        gone = []
        for other, last in self._last.items():
            if last < horizon:
                gone.append(other)
            elif other != key:
                alone = False
        for other in gone:
            del self._last[other]
        self._last[key] = now
        return alone


class ActivityMiddleware:
    """Sets :data:`ALONE` for each HTTP request and counts the open WebSocket streams."""

    def __init__(self, app: ASGIApp, activity: ClientActivity):
        self.app, self.activity = app, activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            ALONE.set(self.activity.request(scope.get("client")))
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            self.activity.streams += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.activity.streams -= 1
        else:
            await self.app(scope, receive, send)
