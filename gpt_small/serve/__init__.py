"""`gpt-small serve`: an OpenAI-compatible HTTP API and a page for writing poems, over one model
shared by every request through continuous batching.

  protocol.py   request decoding and checks -> request objects, or 4xx in OpenAI's error shape
  engine.py     the decode loop on a worker thread: continuous batching over the KV cache
  responses.py  response encoding: OpenAI completion objects, stream chunks, SSE
  app.py        the Starlette app wiring the three, auth and request logging
  server.py     load a checkpoint, bind, run uvicorn, drain on Ctrl-C / SIGTERM
  static/       the page (plain HTML, CSS and JS; no external assets)
"""

from .app import create_app
from .engine import Engine, Sequence
from .server import serve

__all__ = ["create_app", "Engine", "Sequence", "serve"]
