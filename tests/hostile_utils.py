"""Helpers of the hostile suite: an in-process engine fixture's settings and uvicorn in a thread of the test process
(the server's own HTTP limits), so a test needs no server subprocess."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.serve_utils import free_port


class ThreadServer:
    """`app` on uvicorn in a daemon thread on 127.0.0.1, configured as `weavelm serve` configures it."""

    def __init__(self, app: Any, limits: Any = None):
        import uvicorn

        from weavelm.serve.http_limits import HTTPLimits, uvicorn_kwargs

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                access_log=False, **uvicorn_kwargs(limits or HTTPLimits()))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
