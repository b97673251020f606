"""`gpt-small serve`: an OpenAI-compatible HTTP API and a page for writing poems, over one model
shared by every request through continuous batching.

  protocol.py   request decoding and checks -> request objects, or 4xx in OpenAI's error shape
  engine.py     the decode loop on a worker thread: continuous batching over the KV cache
  responses.py  response encoding: OpenAI completion and chat objects, stream chunks, logprobs, SSE
  app.py        the Starlette app wiring the three: handlers, auth, request logging
  guard.py      header size, Host and content-type checks before any route
  metrics.py    /metrics (prometheus_client)
  openapi.py    /openapi.json, with the bounds protocol.py enforces
  connections.py  uvicorn's h11 protocol with a header deadline and a connection cap
  server.py     load a checkpoint, bind, run uvicorn, drain on Ctrl-C / SIGTERM
  static/       the page (plain HTML, CSS and JS; no external assets)
"""

from .app import create_app
from .engine import Engine, Sequence
from .server import serve

__all__ = ["create_app", "Engine", "Sequence", "serve"]
