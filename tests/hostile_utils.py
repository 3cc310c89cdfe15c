"""Helpers of the hostile suite: an in-process engine fixture's settings and uvicorn in a thread of the test process
(the server's own HTTP limits), so a test needs no server subprocess."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.serve_utils import free_port


class ThreadServer:
    """`app` on uvicorn in a daemon thread on 127.0.0.1, configured as `weavelm serve` configures it."""

    def __init__(self, app: Any, limits: Any = None, shutdown_timeout: float = 10.0):
        from weavelm.serve.cli import make_server
        from weavelm.serve.http_limits import HTTPLimits

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, host="127.0.0.1", port=self.port, log_level="warning",
                                  limits=limits or HTTPLimits(), shutdown_timeout=shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """A graceful shutdown, as SIGTERM starts it."""
        self.server.should_exit = True
        self.thread.join(30)
