"""`weavelm serve`: the OpenAI-compatible server on uvicorn. Heavy imports (FastAPI, uvicorn, torch) happen in
`cmd_serve`, so building the CLI parser stays light and works without the `[serve]` extra."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

from weavelm.errors import WeaveError
from weavelm.serve.http_limits import DEFAULT_MAX_BODY_BYTES, HTTPLimits

logger = logging.getLogger("weavelm.serve")
ABORT_GRACE_S = 5.0  # after aborting at --shutdown-timeout, how long responses get to end before uvicorn cancels


def add_serve_parser(subparsers: argparse._SubParsersAction,
                     add_engine_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    if add_engine_args is None:
        from weavelm.cli import add_engine_args
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                          "/v1/models, /health, /version, /tokenize, /detokenize, /metrics.")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model to serve (vLLM's positional form of "
                                                                "--model)")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("WEAVELM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint but /health (default: "
                        "$WEAVELM_API_KEY, else none)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="model name(s) clients use; the first appears in responses (default: the model folder's "
                        "name, never its path)")
    g.add_argument("--max-waiting-requests", type=int, metavar="N",
                   help="answer 429 while N requests wait for their first token, 400 to a request of more than N "
                        "completions (default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, let running requests finish this long, then abort them: streams end "
                        "with finish_reason \"abort\", others get 503 (default 10)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES}; 0: no cap)")
    g.add_argument("--timeout-keep-alive", type=float, default=HTTPLimits.timeout_keep_alive, metavar="SECONDS",
                   help=f"close idle keep-alive connections after this long (default "
                        f"{HTTPLimits.timeout_keep_alive:g})")
    g.add_argument("--request-read-timeout", type=float, default=HTTPLimits.request_read_timeout,
                   metavar="SECONDS", help=f"a client must send a whole request (headers and body) within this "
                                           f"long, else 408 (default {HTTPLimits.request_read_timeout:g})")
    g.add_argument("--max-header-bytes", type=int, default=HTTPLimits.max_header_bytes, metavar="N",
                   help=f"larger request lines and headers get 431 (default {HTTPLimits.max_header_bytes})")
    g.add_argument("--limit-concurrency", type=int, default=HTTPLimits.limit_concurrency, metavar="N",
                   help=f"most open connections and tasks; more get 503 (default {HTTPLimits.limit_concurrency}; "
                        f"0: no limit)")
    g.add_argument("--lora-allowed-paths", nargs="+", metavar="DIR",
                   help="with --enable-lora: directories LoRA adapters may be loaded from at run time (POST "
                        "/v1/load_lora_adapter, /v1/unload_lora_adapter); default: run-time loading is off")
    g.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="API-server processes in front of one engine core (vLLM's flag; default 1). Each turns its "
                        "share of the tokens into HTTP, so a busy GPU is not held back by one process's Python; "
                        "implies engine_process")
    g.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads in every process (sets the config's num_threads; default: the cores "
                        "not busy now)")
    t = p.add_argument_group("tool calling and reasoning (vLLM's flags)")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (the default when a request has tools): the model decides, and '
                        "--tool-call-parser finds its calls in the output. \"required\" and named functions work "
                        "without it (held to a JSON schema by structured outputs)")
    t.add_argument("--tool-call-parser", metavar="NAME",
                   help="the tool_parser plugin that reads the model's calls: hermes (Qwen2.5, Qwen3, Hermes), "
                        "llama3_json (Llama 3.x), or an installed plugin's")
    t.add_argument("--reasoning-parser", metavar="NAME",
                   help="the reasoning_parser plugin that fills message.reasoning_content: qwen3 (<think>...</think>"
                        "), deepseek_r1, or an installed plugin's")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    p.set_defaults(handler=cmd_serve)


def _check_args(args: argparse.Namespace) -> None:
    problems = []
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        problems.append(f"MODEL {tag!r} and --model {args.model!r} disagree; give one of them")
    elif tag is not None:
        args.model = tag
    if not 0 <= args.port <= 65535:
        problems.append(f"--port: must be in [0, 65535] (got {args.port})")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        problems.append(f"--max-waiting-requests: must be >= 0 (got {args.max_waiting_requests})")
    if not args.shutdown_timeout >= 0:
        problems.append(f"--shutdown-timeout: must be >= 0 seconds (got {args.shutdown_timeout})")
    if args.api_server_count < 1:
        problems.append(f"--api-server-count: must be >= 1 (got {args.api_server_count})")
    if args.num_threads is not None and args.num_threads < 1:
        problems.append(f"--num-threads: must be >= 1 (got {args.num_threads})")
    for path in getattr(args, "lora_allowed_paths", None) or []:
        if not os.path.isdir(path):
            problems.append(f"--lora-allowed-paths: {path!r} is not a directory")
    if args.api_key is not None and not args.api_key:
        problems.append("--api-key: must not be empty")
    for flag in ("max_request_body_bytes", "max_header_bytes", "limit_concurrency"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')}: must be >= 0 (got {getattr(args, flag)})")
    for flag in ("timeout_keep_alive", "request_read_timeout"):
        if not getattr(args, flag) > 0:
            problems.append(f"--{flag.replace('_', '-')}: must be > 0 seconds (got {getattr(args, flag)})")
    if problems:
        raise WeaveError("; ".join(problems))
    tool_settings(args)  # an unknown parser fails before the model loads


def tool_settings(args: argparse.Namespace) -> Any:
    """The server's ToolSettings from --enable-auto-tool-choice, --tool-call-parser and --reasoning-parser."""
    from weavelm.tools.settings import ToolSettings

    return ToolSettings.from_flags(getattr(args, "enable_auto_tool_choice", False),
                                   getattr(args, "tool_call_parser", None), getattr(args, "reasoning_parser", None))


def cmd_serve(args: argparse.Namespace) -> int:
    _check_args(args)  # before the model loads
    if args.log_level in ("info", "debug"):  # the per-request and throughput lines (weavelm.serve.request_log)
        logging.getLogger("weavelm.serve").setLevel(logging.INFO)
    try:
        import uvicorn  # noqa: F401

        from weavelm.serve.app import build_app  # noqa: F401
    except ImportError as e:
        raise WeaveError(f"serve: needs the [serve] extra (pip install 'weavelm[serve]'): {e}") from e
    import torch

    from weavelm.cli import engine_config_from_args
    from weavelm.core.async_llm import AsyncLLM

    config = engine_config_from_args(args, num_threads=args.num_threads)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)  # this process; the config carries it to the model's processes
    if args.api_server_count > 1:
        if _explicit_engine_process(args) and not config.engine_process:
            raise WeaveError("--api-server-count: several API servers share one engine core in its own process; "
                             "drop `engine_process=false` or use --api-server-count 1")
        from weavelm.serve.multi import serve_multi

        return serve_multi(args, config)
    if _engine_process_by_default(args, config):
        config.engine_process = True
    engine = AsyncLLM(config=config)
    try:
        run_uvicorn(args, engine)
    finally:
        engine.shutdown()
    return 0


def run_uvicorn(args: argparse.Namespace, engine, sockets: list | None = None, metrics_dir: str | None = None,
                stop_early: Any = None) -> None:
    """Build the app on `engine` and run uvicorn until a graceful shutdown; on `sockets` (already bound, shared
    by several API servers) or on --host/--port. `stop_early` (an Event set by a SIGTERM that came before uvicorn
    handled the signals): shut down as soon as it has started."""
    from weavelm.serve.app import build_app
    from weavelm.utils import freeze_gc_heap

    app = build_app(engine, args.served_model_name, args.api_key, args.max_waiting_requests, metrics_dir,
                    max_request_body_bytes=args.max_request_body_bytes or None,
                    lora_allowed_paths=getattr(args, "lora_allowed_paths", None), tools=tool_settings(args))
    freeze_gc_heap()
    server = make_server(app, host=args.host, port=args.port, log_level=args.log_level,
                         access_log=bool(getattr(args, "verbose", False)), limits=http_limits(args),
                         shutdown_timeout=args.shutdown_timeout)
    server.stop_early = stop_early
    try:
        server.run(sockets=sockets)
    finally:
        app.state.serve.prompts.close()


def http_limits(args: argparse.Namespace) -> HTTPLimits:
    return HTTPLimits(timeout_keep_alive=args.timeout_keep_alive, request_read_timeout=args.request_read_timeout,
                      max_header_bytes=args.max_header_bytes, limit_concurrency=args.limit_concurrency or None)


def make_server(app: Any, *, host: str, port: int, limits: HTTPLimits, shutdown_timeout: float,
                log_level: str = "info", access_log: bool = False) -> Any:
    """uvicorn's server for `app` (built by `build_app`) with the HTTP `limits`. On a graceful shutdown it lets
    requests run `shutdown_timeout` seconds, then aborts them through the app, so every response still ends
    properly (503 in OpenAI's shape, or a stream's final "abort" chunk and [DONE])."""
    import uvicorn

    from weavelm.serve.http_limits import uvicorn_kwargs

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout + ABORT_GRACE_S, **uvicorn_kwargs(limits))
    server = _Server(config)
    server.abort_after = shutdown_timeout
    server.abort_all = app.state.serve.abort_all
    return server


def _explicit_engine_process(args: argparse.Namespace) -> bool:
    from weavelm.core.config import read_yaml

    if any(s.split("=", 1)[0].strip() == "engine_process" for s in args.sets or []):
        return True
    return bool(args.config and "engine_process" in (read_yaml(args.config) or {}))


def _engine_process_by_default(args: argparse.Namespace, config) -> bool:
    """As vLLM's server does, run the engine core in its own process on a GPU, so HTTP, SSE and detokenizing in
    this process never hold the GIL the scheduler and the step's Python need; the GPU keeps stepping while
    responses are written. On the CPU the two processes would compete for the same cores, so the core stays a
    thread here. An explicit `engine_process` (YAML or --set) always wins."""
    from weavelm.core.device import resolve_device

    if _explicit_engine_process(args):
        return False
    return resolve_device(config.device).type == "cuda"


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a graceful shutdown on SIGTERM/SIGINT exits 0: uvicorn re-raises the
        signal after shutting down, which would end the process with the signal's status."""

        stop_early = None
        abort_after = 0.0
        abort_all = None

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

        async def shutdown(self, sockets=None) -> None:
            import asyncio

            timer = asyncio.get_running_loop().call_later(self.abort_after, self.abort_all) \
                if self.abort_all is not None else None
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.stop_early is not None and self.stop_early.is_set():
                self.should_exit = True

    return Server


def _Server(config):  # noqa: N802 (a class, built lazily so uvicorn is imported only by `serve`)
    return _server_class()(config)
