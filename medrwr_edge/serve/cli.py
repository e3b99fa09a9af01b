"""`medrwr-edge serve`: load the model and packs once, then answer HTTP requests on loopback (by default)."""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import typer

from ..runtime import cli_options as O
from .config import ServeConfig

SERVE_HELP = """Run a local HTTP service: POST /v1/ask, POST /v1/chat/completions (OpenAI format), GET /v1/packs,
/v1/models, /v1/health, and a web page at /. Listens on 127.0.0.1 unless told otherwise; any other address
needs --api-key-file. Needs the package's "serve" extra (FastAPI, uvicorn, python-multipart)."""


def _config_option(name: str, flag: str, help: str):
    """A ServeConfig option: unset (None) unless given; its default is ServeConfig's."""
    return typer.Option(None, flag, help=help, show_default=str(getattr(ServeConfig, name)))


def register(app: typer.Typer) -> None:
    app.command("serve", help=SERVE_HELP)(serve_command)


def serve_command(
    host: Optional[str] = _config_option("host", "--host", "address to listen on (non-loopback needs --api-key-file)"),
    port: Optional[int] = _config_option("port", "--port", "TCP port (0: any free port)"),
    model: Optional[str] = O.MODEL,
    pack: Optional[List[str]] = O.PACKS,
    image_pack: Optional[str] = typer.Option(None, "--image-pack", help="CDIR reference image pack"),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="serve without knowledge packs"),
    max_queue: Optional[int] = _config_option("max_queue", "--max-queue",
                                              "requests that may wait; more get 429 + Retry-After"),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="file whose first line is the API key"),
    cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="allow this web origin (repeat)"),
    max_body_mb: Optional[float] = typer.Option(None, "--max-body-mb", help="largest request body accepted (MB)",
                                                show_default=f"{ServeConfig.max_body_bytes / 2 ** 20:g}"),
    shutdown_timeout: Optional[float] = _config_option("shutdown_timeout", "--shutdown-timeout",
                                                       "seconds in-flight requests get on stop"),
    keep_reports: Optional[int] = _config_option("keep_reports", "--keep-reports",
                                                 "finished HTML reports kept in memory (0: none)"),
    n_ctx: Optional[int] = O.CTX,
    threads: Optional[int] = O.THREADS,
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    no_log: bool = typer.Option(False, "--no-log", help="do not append answers to the local answer log"),
    engine: Optional[str] = O.ENGINE,
    engine_timeout: Optional[float] = O.ENGINE_TIMEOUT,
    engine_parallel: Optional[int] = typer.Option(None, "--engine-parallel", help="with --engine: questions answered "
                                                  "at once, each on its own server sequence (default: the server's "
                                                  "slots where it says, else 1)"),
) -> None:
    from ..errors import InputError
    from .config import read_api_key

    config = ServeConfig.from_options(
        host=host, port=port, max_queue=max_queue, cors_origins=list(cors_origin or []),
        max_body_bytes=int(max_body_mb * 2 ** 20) if max_body_mb is not None else None,
        shutdown_timeout=shutdown_timeout, keep_reports=keep_reports,
        api_key=read_api_key(api_key_file) if api_key_file else None, log_answers=not no_log,
        engine_parallel=engine_parallel,
    )
    if engine_parallel is not None and not engine:
        raise InputError("--engine-parallel needs --engine: in-process the model decodes one question at a time")
    config.check()  # before loading anything: a refused bind costs nothing
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise InputError(f"serve needs the serve extra ({e.name} is missing): pip install -e \".[serve]\"") from None
    from ..runtime.api import AskSettings, Session

    settings = AskSettings.from_options(n_ctx=n_ctx, n_threads=threads, gpu_layers=gpu_layers, engine=engine,
                                        retrieval=O.switched(no_retrieval, "retrieval"), engine_timeout=engine_timeout)
    # Load now, so a missing model or pack is one error line, not a failed server start.
    session = Session(packs=pack or None, image_pack=image_pack, model=model, settings=settings)
    _configure_logging()
    app = create_app(lambda: session, config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, access_log=False, server_header=False, log_level="info",
        timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)), lifespan="on",
    ))
    try:
        server.run()  # on SIGTERM/SIGINT: stop accepting, let in-flight requests finish (or abort them), close
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal after its graceful shutdown; stopping is not an error
    finally:
        session.close()  # idempotent after the lifespan closed it
    if not server.started:
        raise InputError(f"could not listen on {config.host}:{config.port} (address in use or not allowed)")


def _configure_logging() -> None:
    """Our request log (id, route, status, time: never content) to stderr."""
    logger = logging.getLogger("medrwr_edge.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
