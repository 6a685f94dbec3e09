"""`tandem serve`: the cloud inference server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from tandem.errors import ConfigError, MissingDependencyError

from .config import ServerConfig

_File = {"exists": True, "dir_okay": False}


def serve(
    repository: Annotated[
        Path,
        typer.Option(
            "--repository",
            "-r",
            help="Model repository folder.",
            exists=True,
            file_okay=False,
            resolve_path=True,
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="gRPC port (V2 + grpc.health.v1).")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP/REST port; 0 disables it.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port; 0 disables it.")] = 8002,
    token: Annotated[
        str | None,
        typer.Option(envvar="TANDEM_SERVE_TOKEN", help="Bearer token every call must carry."),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(**_File, help="File holding the bearer token.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(**_File, help="Server certificate (PEM).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(**_File, help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(**_File, help="CA (PEM) client certificates must chain to: turns on mTLS."),
    ] = None,
    max_message_bytes: Annotated[int, typer.Option(help="Largest gRPC message.")] = 64 << 20,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between repository scans; 0: off.")
    ] = 0.0,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds SIGTERM waits for queued work.")
    ] = 30.0,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Serve only this model (repeatable).")
    ] = None,
    access_log: Annotated[bool, typer.Option(help="One structured log line per request.")] = True,
    loop: Annotated[
        str, typer.Option(help="Event loop: auto (uvloop when installed), uvloop or asyncio.")
    ] = "auto",
) -> None:
    """Serve a model repository over gRPC (Open Inference Protocol) and HTTP."""
    try:
        from .server import serve_forever
    except ImportError as exc:  # fastapi, uvicorn, prometheus-client, grpcio-health-checking
        raise MissingDependencyError(exc.name or str(exc), "cloud", "tandem serve") from exc

    if token is not None and token_file is not None:
        raise ConfigError("token", "give --token or --token-file, not both")
    if token_file is not None:
        token = token_file.read_text().strip()
    config = ServerConfig(
        repository=repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        max_message_bytes=max_message_bytes,
        poll_interval_s=poll_interval,
        drain_timeout_s=drain_timeout,
        models=tuple(model or ()),
    )
    if not access_log:
        logging.getLogger("tandem.cloud.server.access").setLevel(logging.WARNING)
    serve_forever(config, loop)
