"""Checks on a request before any route sees it: header size, the Host header and the body's
content type.

A server on loopback without an API key trusts whoever can reach it, and a web page the user
visits can reach it too: the browser will POST to http://127.0.0.1:8000 from any page when the
body is a "simple" one (text/plain, a form), and a DNS-rebinding page can even read the answer
under its own host name. So:
- with `allowed_hosts` set (serve does so on loopback without a key), a Host header naming
  anything else is refused (400): a rebinding page's requests carry its own name;
- a POST must say `Content-Type: application/json` (415 otherwise): a browser sends that type
  across origins only after a CORS preflight, which this server never approves.
Refusals come in OpenAI's error shape like every other.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from .protocol import HTTP_LIMITS, ApiError, HttpLimits

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]

# route labels for the metrics: a fixed set, so a client cannot make new ones
_ROUTES = ("/", "/healthz", "/metrics", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/v1/poem")


def route_of(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


# name[:port]: the name in brackets (an IPv6 address) or free of colons; the port digits or empty
_NAME_PORT = re.compile(r"\[(?P<bracketed>[^\]]*)\](:[0-9]*)?|(?P<name>[^:\[\]]*)(:[0-9]*)?")


def host_name(header: str) -> str:
    """`example.com:8000` -> example.com, `[::1]:8000` -> ::1 (lower case). Anything else (`::1`
    written without brackets, `[::1]x`, `localhost:80x`) is returned whole: it matches a host name
    only if it is one."""
    h = header.strip().lower()
    m = _NAME_PORT.fullmatch(h)
    if m is None:
        return h
    return m["bracketed"] if m["bracketed"] is not None else m["name"]


def request_head_bytes(scope: dict) -> int:
    """The request line and header lines as they came on the wire (`GET /p?q HTTP/1.1`, `name: value`,
    each with its CRLF), the size `max_header_bytes` bounds."""
    target = len(scope.get("raw_path") or quote(scope["path"]))  # ASGI: raw_path may be missing
    if scope.get("query_string"):
        target += 1 + len(scope["query_string"])
    line = len(scope["method"]) + 1 + target + len(" HTTP/") + len(scope.get("http_version", "1.1")) + 2
    return line + sum(len(k) + 2 + len(v) + 2 for k, v in scope["headers"])


class Guard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, allowed_hosts: list[str] | None = None, http: HttpLimits = HTTP_LIMITS):
        self.app, self.http = app, http
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            err = self.check(scope)
            if err is not None:
                return await self.refuse(err, send)
        await self.app(scope, receive, send)

    def check(self, scope: dict) -> ApiError | None:
        size = request_head_bytes(scope)  # h11 bounds only headers still arriving
        if size > self.http.max_header_bytes:
            return ApiError(431, f"the request's line and headers are larger than {self.http.max_header_bytes} bytes",
                            code="headers_too_large")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")  # an HTTP/1.0 request may have none: refused as well
        if self.allowed is not None and (host is None or host_name(host) not in self.allowed):
            return ApiError(400, "the Host header names a host this server does not answer to "
                                 f"(it answers to {', '.join(sorted(self.allowed))} only)", code="invalid_host")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the body must be sent as Content-Type: application/json, got {kind or 'none'!r}",
                                code="unsupported_media_type")
        return None

    async def refuse(self, err: ApiError, send: Any) -> None:
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
