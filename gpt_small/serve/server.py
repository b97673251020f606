"""`gpt-small serve`: load a checkpoint once and serve it with uvicorn until Ctrl-C or SIGTERM.

A non-loopback address without an API key is refused before anything loads: the server would
hand anyone on the network a CPU to spend. The socket is bound here (port 0 picks a free one) and
the address printed, so scripts and tests can start a server without guessing ports. On Ctrl-C or
SIGTERM uvicorn stops accepting, waits for the open requests (streams included) for up to
`drain_seconds`, then the engine's worker finishes and the process exits 0; a request that still
arrives meanwhile gets 503 with Retry-After. `weights` converts the loaded model's Linear weights
(ops/quantize.py) for faster CPU decoding; clients see which in /healthz and the model object.

On loopback without a key the app answers only to loopback Host names (guard.py says why).
Connections are bounded by connections.py and protocol.HTTP_LIMITS.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import GPTSmallError
from .guard import LOOPBACK_HOSTS
from .protocol import HTTP_LIMITS, HttpLimits

log = logging.getLogger("gpt_small.serve")


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise GPTSmallError(f"--host {host!r} does not resolve: {e.strerror}") from None
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)  # a %scope is parsed too


def model_name_of(checkpoint: str | Path) -> str:
    """The run folder's name (runs/poem-cpu -> poem-cpu), or a checkpoint folder's run's."""
    p = Path(checkpoint).resolve()
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.name


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
          max_queue: int = 64, max_new_tokens: int = 1000, api_key: str | None = None, threads: int = 0,
          drain_seconds: float = 30.0, weights: str = "float32", window_keep: int | str | None = None,
          prefill_batch: int | None = None) -> None:
    from ..checkpoint import load_checkpoint
    from ..device import set_threads
    from ..generate import window_keep as check_keep
    from ..ops.quantize import check_weights, convert_weights
    from .app import create_app

    from .engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_BATCH

    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    prefill_batch = DEFAULT_PREFILL_BATCH if prefill_batch is None else prefill_batch
    api_key = api_key or os.environ.get("GPT_SMALL_API_KEY") or None
    if not is_loopback(host) and api_key is None:
        raise GPTSmallError(f"refusing to serve on {host}, which other machines can reach, without an API key: "
                            "pass --api-key or set GPT_SMALL_API_KEY (or bind 127.0.0.1)")
    for name, value, lo in (("--max-batch", max_batch, 1), ("--prefill-batch", prefill_batch, 1), ("--max-queue", max_queue, 0),
                            ("--max-new-tokens", max_new_tokens, 1), ("--port", port, 0)):
        if value < lo:
            raise GPTSmallError(f"{name} must be >= {lo}, got {value}")
    if port > 65535:
        raise GPTSmallError(f"--port must be <= 65535, got {port}")
    check_weights(weights)
    set_threads(threads)
    # The decode thread and the event loop share the GIL; at the default 5 ms switch interval a
    # token's worth of Python on one side can stall the other for a whole interval
    # (benchmarks/serve_load.py measures the effect on latency).
    sys.setswitchinterval(0.0005)
    ckpt = load_checkpoint(checkpoint, device="cpu")
    convert_weights(ckpt.model, weights)
    check_keep(ckpt.model.config.block_size, window_keep)  # one line, before the port is taken
    name = model_name_of(checkpoint)
    hosts = None if api_key is not None else [*LOOPBACK_HOSTS, host]  # the guard reads them in any case
    app = create_app(model=ckpt.model, tokenizer=ckpt.tokenizer, model_name=name, max_batch=max_batch,
                     max_queue=max_queue, max_new_tokens=max_new_tokens, api_key=api_key, allowed_hosts=hosts,
                     window_keep=window_keep, prefill_batch=prefill_batch)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise GPTSmallError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    # listening before the address is printed: a client that reads it and connects at once waits in
    # the backlog until uvicorn accepts, instead of being refused
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {name} ({ckpt.model.config.num_params():,} parameters, {weights} weights) "
          f"on http://{shown}:{bound}/  (max batch {max_batch}; Ctrl-C drains and stops)", flush=True)
    # uvicorn drains on SIGINT/SIGTERM and then re-raises the signal to the handler it found; a
    # handler that only notes it makes a drained shutdown a normal exit (status 0), not a kill.
    got: list[str] = []
    previous = {sig: signal.signal(sig, lambda s, _: got.append(signal.Signals(s).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        make_server(app, drain_seconds).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped{' by ' + got[0] if got else ''}; open requests drained", flush=True)


def make_server(app: Any, drain_seconds: float, limits: HttpLimits = HTTP_LIMITS) -> Any:
    """uvicorn's Server for the app, with the connection limits; from the first signal on, the app
    answers new work with 503 (its `draining` flag) while uvicorn drains the open requests."""
    import uvicorn

    from .connections import guarded_protocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_seconds,
                            lifespan="on", http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive_seconds,
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    return Server(config)
