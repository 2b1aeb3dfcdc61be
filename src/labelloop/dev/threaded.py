"""Run an ASGI app on 127.0.0.1 in a background thread (the demo, benchmarks and tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from labelloop.dev.launcher import free_port


@contextmanager
def serve_in_thread(
    app,
    *,
    port: int | None = None,
    start_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Serve `app` until the block exits; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name=f"http-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server could not start on 127.0.0.1:{port} (port in use?)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
