"""The OpenAI-compatible server (``cascade serve``): ``protocol`` (wire format), ``routes`` (FastAPI app),
``serving`` (the engine thread and its asyncio bridge), ``metrics`` (Prometheus collectors).

    from cascade.server import create_app
    app = create_app(Cascade.from_pretrained(), default_policy="chow(alpha=0.2)")

``run_server`` serves an app with uvicorn until interrupted; importing this package starts nothing.
"""

from __future__ import annotations

from cascade.library import Cascade
from cascade.policies import Policy, parse_policy


def create_app(cascade: Cascade, *, default_policy: str | Policy | None = None, served_name: str = "cascade",
               max_queue: int = 64, default_max_tokens: int = 256, drain_timeout_s: float = 30.0,
               api_key: str | None = None, keepalive_s: float = 10.0):
    """A FastAPI app serving ``cascade``; its engine thread starts with the app (lifespan) and drains at
    shutdown. ``app.state.engine_loop`` and ``app.state.metrics`` give tests and embedders access. With
    ``api_key`` every ``/v1`` route answers 401 unless the request carries ``Authorization: Bearer <api_key>``;
    ``keepalive_s``: an SSE comment after that long without a chunk."""
    from cascade.server.metrics import ServerMetrics
    from cascade.server.routes import ServerConfig, build_app
    from cascade.server.serving import EngineLoop

    metrics = ServerMetrics(served_name)
    loop = EngineLoop(cascade, max_queue=max_queue, metrics=metrics)
    if default_policy is None:
        default_policy = cascade.default_policy()
    config = ServerConfig(served_name=served_name, default_policy=parse_policy(default_policy),
                          default_max_tokens=default_max_tokens, drain_timeout_s=drain_timeout_s,
                          api_key=api_key, keepalive_s=keepalive_s)
    app = build_app(loop, config, metrics)
    app.state.engine_loop, app.state.metrics = loop, metrics
    return app


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; uvicorn then runs the app's shutdown, which drains the engine, and
    the process exits with status 0.

    uvicorn re-raises the captured signal once it has shut down, which would end the process "killed by
    SIGTERM" (status 143) even after a clean drain; the handlers installed here (in the process that
    serves, for its lifetime) turn that re-raised signal into a normal exit."""
    import signal
    import threading

    import uvicorn

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
