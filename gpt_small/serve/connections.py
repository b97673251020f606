"""Connections that cannot pile up: uvicorn's h11 protocol with a deadline for a request's headers
and a cap on open connections.

uvicorn closes a keep-alive connection that stays idle between requests, but a connection that
never sends a request, or trickles its headers a byte at a time, is kept open for ever: a few
hundred of them use up the process's file descriptors and the server stops answering. Here:
- every connection must deliver a request's headers within `header_seconds` of opening (and of
  its previous response ending), or it is closed; the headers are bounded by h11 in size too;
- past `max_connections` open connections, the oldest idle one (no request in progress) is
  closed for each new one, so a crowd of idle sockets cannot lock out a new client. When none is
  idle the new connection is closed at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import HttpLimits


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """An H11Protocol class for uvicorn's `http=` with these limits."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, **kw: Any):  # uvicorn passes every argument by keyword
            super().__init__(**kw)
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.opened = self.loop.time()
            self._arm()
            if len(self.connections) > limits.max_connections:
                idle = [c for c in self.connections if c is not self and _idle(c)]
                victim = min(idle, key=lambda c: c.opened) if idle else self
                victim.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._armed_for = self.cycle  # the deadline's request cycle: a new request replaces self.cycle
            self._deadline = self.loop.call_later(limits.header_seconds, self._expire)

        def _expire(self) -> None:
            if self.cycle is self._armed_for and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def _idle(c: Any) -> bool:
    return c.cycle is None or c.cycle.response_complete
