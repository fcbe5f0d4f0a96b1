"""Whether the request being answered is the only client the service is serving.

With one client, the thread hand-off of its model call (to a worker and back, each side waking a
sleeping thread) is the largest part of what the service adds to the call, and nothing else waits
for the event loop meanwhile: so a lone client's clip (one call of its request's clips: one, or the
bundle's ``test_clips``) runs on the event loop (``Predictor.predict(..., inline=True)``; setting
``inline_when_alone``). At one client this took the median latency over the server's own model call
from +19-29% to +15-23%, lower or equal in each of sixteen rounds alternating with the previous
server on a 2-core AMD EPYC, 5 points on average (``benchmarks/serve_load.py --clients 1 --body
npy``; README, "The service under load").

"Alone" is decided when the model is about to be called, per connection, not per request in flight
alone: with two clients, a call run on the loop holds the other client's request unread, so counting
requests in flight would find only one and run that one on the loop too, and the clients would take
turns on one core (an earlier stop: 312-375 against 373-407 requests/s at 2 clients). A request is
alone when it is the only HTTP request in flight, no WebSocket stream is open, and no other
connection started or finished a request within :data:`WINDOW_S` (a finish counts: a model call
longer than the window must not make the other client look gone). Connections are told apart by
``scope["client"]``; where it has no port (uvicorn puts the ``X-Forwarded-For`` address there,
port 0, behind a proxy) or is missing, connections cannot be told apart and nothing is alone. A
client that opens a connection per request is never alone either (its previous connections are seen
within the window): it keeps the worker path, as every request did before.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

WINDOW_S = 0.1  # another connection active within 100 ms: not alone
PRUNE_AT = 256  # connections remembered before the quiet ones are forgotten

Connection = tuple  # (host, port) of an HTTP connection
CONNECTION: ContextVar[Connection | None] = ContextVar("ntu_serve_connection", default=None)


def connection_of(client) -> Connection | None:
    """``scope["client"]`` as a key that tells connections apart, or None where it cannot."""
    if not client or len(client) != 2 or not client[1]:
        return None
    return tuple(client)


class ClientActivity:
    """The HTTP requests in flight, the WebSocket streams open, and when each connection was last
    active (a request started or finished)."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.in_flight = 0
        self.streams = 0
        self._last: dict[Connection, float] = {}

    def started(self, connection: Connection | None, now: float | None = None) -> None:
        self.in_flight += 1
        self._seen(connection, now)

    def finished(self, connection: Connection | None, now: float | None = None) -> None:
        self.in_flight -= 1
        self._seen(connection, now)

    def alone(self, connection: Connection | None, now: float | None = None) -> bool:
        """Whether ``connection``'s request in flight is the only one, with no stream open and no
        other connection active within the window."""
        if connection is None or self.in_flight != 1 or self.streams:
            return False
        horizon = (time.monotonic() if now is None else now) - self.window_s
        return all(last < horizon for other, last in self._last.items() if other != connection)

    def _seen(self, connection: Connection | None, now: float | None) -> None:
        if connection is None:
            return
        now = time.monotonic() if now is None else now
        self._last[connection] = now
        if len(self._last) > PRUNE_AT:  # forget the quiet ones: they cannot make anyone not alone
            horizon = now - self.window_s
            self._last = {c: t for c, t in self._last.items() if t >= horizon}


class ActivityMiddleware:
    """Records each HTTP request's start and finish (and its connection in :data:`CONNECTION`), and
    counts the open WebSocket streams."""

    def __init__(self, app: ASGIApp, activity: ClientActivity):
        self.app, self.activity = app, activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            connection = connection_of(scope.get("client"))
            CONNECTION.set(connection)
            self.activity.started(connection)
            try:
                await self.app(scope, receive, send)
            finally:
                self.activity.finished(connection)
        elif scope["type"] == "websocket":
            self.activity.streams += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.activity.streams -= 1
        else:
            await self.app(scope, receive, send)
