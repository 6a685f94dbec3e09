"""`tandem fleet ...`: serve, import, broker-config."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tandem.errors import TandemError

log = logging.getLogger(__name__)

app = typer.Typer(
    name="fleet",
    help="The fleet service: devices, signed model delivery over MQTT, staged rollouts.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_DB = "sqlite:///fleet.db"


def _db_url(db: str) -> str:
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).resolve()}"


def _trusted(
    trusted_key: list[Path] | None, signing_key: Path | None, out_dir: Path
) -> tuple[Path, ...]:
    keys = list(trusted_key or [])
    if signing_key is not None:
        # The service only verifies; from a signing key it needs just the public half.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        private = serialization.load_pem_private_key(signing_key.read_bytes(), None)
        if not isinstance(private, Ed25519PrivateKey):
            raise typer.BadParameter(f"{signing_key} is not an ed25519 private key")
        pub = out_dir / "signing.pub"
        out_dir.mkdir(parents=True, exist_ok=True)
        pub.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        keys.append(pub)
    return tuple(keys)


def _tokens(api_token: list[str] | None, api_token_file: Path | None) -> dict[str, str]:
    """`user:token` pairs -> {token: user}; a bare token acts as user `api`."""
    items = list(api_token or [])
    if api_token_file is not None:
        items += [
            ln.strip()
            for ln in api_token_file.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
    out = {}
    for item in items:
        user, sep, token = item.partition(":")
        if not sep:
            user, token = "api", item
        out[token] = user
    return out


@app.command()
def serve(
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")],
    username: Annotated[str, typer.Option(help="Broker user name.")] = "tandem-fleet",
    password: Annotated[
        str, typer.Option(envvar="TANDEM_FLEET_PASSWORD", help="Broker password.")
    ] = "",
    password_file: Annotated[
        Path | None, typer.Option(help="File holding the broker password.")
    ] = None,
    client_id: Annotated[str, typer.Option(help="MQTT client id (stable per replica).")] = "",
    db: Annotated[str, typer.Option(help="SQLAlchemy URL or SQLite file.")] = DEFAULT_DB,
    artifacts: Annotated[Path, typer.Option(help="Artifact storage folder.")] = Path(
        "fleet-artifacts"
    ),
    signing_key: Annotated[
        Path | None, typer.Option(help="ed25519 signing key (public half used).")
    ] = None,
    trusted_key: Annotated[
        list[Path] | None, typer.Option(help="Trusted ed25519 public key.")
    ] = None,
    fleet_key: Annotated[
        Path | None,
        typer.Option(
            help="ed25519 private key that signs desired states; default "
            "ARTIFACTS/.keys/fleet.key, generated when missing."
        ),
    ] = None,
    zoo: Annotated[Path | None, typer.Option(help="Import this model zoo at start.")] = None,
    rest_host: Annotated[str, typer.Option()] = "127.0.0.1",
    rest_port: Annotated[int | None, typer.Option(help="Serve the REST API on this port.")] = None,
    api_token: Annotated[
        list[str] | None, typer.Option(help="user:token for the REST API.")
    ] = None,
    api_token_file: Annotated[Path | None, typer.Option(help="File of user:token lines.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Artifact chunk size in bytes.")] = 64 * 1024,
    tick: Annotated[float, typer.Option(help="Seconds between rollout-engine turns.")] = 0.5,
    telemetry_window: Annotated[float, typer.Option(help="Seconds per telemetry window.")] = 60.0,
    telemetry_retention: Annotated[float, typer.Option(help="Seconds telemetry is kept.")] = 7
    * 86400.0,
    no_engine: Annotated[bool, typer.Option(help="Replica without the rollout engine.")] = False,
    replica_id: Annotated[
        str, typer.Option(help="Name in the engine's leader election (default hostname:pid).")
    ] = "",
    leader_lease: Annotated[
        float | None, typer.Option(help="Seconds a silent engine leader keeps the lead.")
    ] = None,
    session_expiry: Annotated[
        int,
        typer.Option(
            help="Seconds the broker keeps this replica's MQTT session (and queues its share "
            "of devices' messages) after it drops out."
        ),
    ] = 60,
) -> None:
    """Run the fleet service until SIGTERM or Ctrl-C."""
    # This command is the composition root of a fleet-service process, which serves the
    # console too: the one place in fleet allowed to import it (pyproject's layers contract).
    from tandem.cloud.console.app import create_fleet_app

    from .mqtt import BrokerSettings
    from .node import FleetNode
    from .service import ServiceConfig

    if password_file is not None:
        password = password_file.read_text().strip()
    try:
        config = ServiceConfig(
            db_url=_db_url(db),
            artifacts_dir=artifacts.resolve(),
            trusted_keys=_trusted(trusted_key, signing_key, artifacts.resolve() / ".keys"),
            fleet_key=fleet_key.resolve() if fleet_key else None,
            chunk_size=chunk_size,
            tick_s=tick,
            telemetry_window_s=telemetry_window,
            telemetry_retention_s=telemetry_retention,
            api_tokens=_tokens(api_token, api_token_file),
            replica_id=replica_id,
            leader_lease_s=leader_lease,
        )
        settings = BrokerSettings(
            broker,
            username,
            password,
            client_id or f"{username}-0",
            session_expiry_s=session_expiry,
        )
        node = FleetNode(
            config,
            settings,
            rest_host=rest_host,
            rest_port=rest_port,
            run_engine=not no_engine,
            app_factory=create_fleet_app,
        )
        if not config.api_tokens and rest_port:
            # Fail closed, but say so: otherwise every REST and console call is a silent 401.
            typer.secho(
                "warning: no --api-token or --api-token-file given: the REST API and the "
                "console refuse every request",
                fg="yellow",
                err=True,
            )
        if zoo is not None:
            imported = node.service.import_zoo(zoo)
            log.info("imported %d artifact variants from %s", len(imported), zoo)
        node.start()
    except TandemError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        node.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    typer.echo(
        f"fleet service up: broker {broker}, db {config.db_url}"
        + (f", REST on http://{rest_host}:{rest_port}" if rest_port else "")
    )
    try:
        node.wait()
    finally:
        node.stop()


@app.command("import")
def import_(
    zoo: Annotated[Path, typer.Option(help="Model zoo folder (written by `tandem models build`).")],
    db: Annotated[str, typer.Option(help="SQLAlchemy URL or SQLite file.")] = DEFAULT_DB,
    artifacts: Annotated[Path, typer.Option(help="Artifact storage folder.")] = Path(
        "fleet-artifacts"
    ),
    trusted_key: Annotated[
        list[Path] | None, typer.Option(help="Trusted ed25519 public key.")
    ] = None,
) -> None:
    """Import a zoo's signed artifacts into the fleet store."""
    from .service import FleetService, ServiceConfig

    try:
        service = FleetService(
            ServiceConfig(_db_url(db), artifacts.resolve(), tuple(trusted_key or ()))
        )
        try:
            imported = service.import_zoo(zoo)
        finally:
            service.close()
    except TandemError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    for model, version, variant in imported:
        typer.echo(f"imported {model} v{version} {variant}")


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option(help="Folder to write mosquitto.conf, passwd, acl into.")],
    devices: Annotated[int, typer.Option(help="Number of device identities (device-0001...).")] = 0,
    device_ids: Annotated[
        list[str] | None, typer.Option(help="Explicit device ids (repeatable).")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Prefix for generated device ids.")] = "device-",
    host: Annotated[str, typer.Option(help="Listener address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listener port.")] = 1883,
    fleet_user: Annotated[
        str, typer.Option(help="The fleet service's user name.")
    ] = "tandem-fleet",
    persistence: Annotated[
        bool, typer.Option(help="Persist retained messages and sessions.")
    ] = True,
) -> None:
    """Write a Mosquitto config, password file and ACL for the service and N devices."""
    from .broker_config import BrokerConfig, device_ids_for, write_broker_config

    ids = list(device_ids or [])
    for item in list(ids):
        if "," in item:
            ids.remove(item)
            ids += [x for x in item.split(",") if x]
    ids += device_ids_for(devices, prefix) if devices else []
    if not ids:
        raise typer.BadParameter("give --devices N or --device-ids")
    try:
        written = write_broker_config(BrokerConfig(out, host, port, fleet_user, persistence), ids)
    except TandemError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        json.dumps(
            {
                "config": str(written.conf),
                "credentials": str(written.credentials),
                "fleet_password_file": str(written.fleet_password_file),
                "devices": len(written.device_passwords),
                "run": f"mosquitto -c {written.conf}",
            },
            indent=2,
        )
    )


@app.command("fleet-key")
def fleet_key_command(
    artifacts: Annotated[Path, typer.Option(help="Artifact storage folder.")] = Path(
        "fleet-artifacts"
    ),
    fleet_key: Annotated[
        Path | None, typer.Option(help="The fleet key; default ARTIFACTS/.keys/fleet.key.")
    ] = None,
) -> None:
    """Print the public fleet key (PEM) that agents verify desired states with
    (`tandem agent run --fleet-key`); generates the key pair when it is missing."""
    from .fleet_key import DEFAULT_KEY_FILE, FleetKey

    path = fleet_key or artifacts.resolve() / DEFAULT_KEY_FILE
    try:
        key = FleetKey.load_or_create(path)
    except TandemError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    # The PEM alone on stdout, so `tandem fleet fleet-key > fleet.pub` writes a key file.
    typer.echo(
        f"fleet key {key.keyid} ({path}); public half also in {path.with_suffix('.pub')}",
        err=True,
    )
    typer.echo(key.public_pem.decode(), nl=False)
