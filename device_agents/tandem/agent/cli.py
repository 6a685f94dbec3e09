"""`tandem agent run`: the device agent as a foreground daemon (SIGTERM/SIGINT stop it)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.sdk.tags import parse_tags

app = typer.Typer(help="The device agent.", no_args_is_help=True, add_completion=False)
log = logging.getLogger(__name__)


@app.command()
def run(
    device_id: Annotated[str, typer.Option(help="This device's id (its topic level).")],
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")],
    store: Annotated[Path, typer.Option(help="The model store folder.")],
    trusted_key: Annotated[list[Path], typer.Option(help="ed25519 public key (PEM); repeatable.")],
    fleet_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="The fleet service's ed25519 public key (PEM): obey only desired states it "
            "signed; repeatable (`tandem fleet fleet-key` prints it)."
        ),
    ] = None,
    username: Annotated[str | None, typer.Option()] = None,
    password: Annotated[str | None, typer.Option(envvar="TANDEM_AGENT_PASSWORD")] = None,
    password_file: Annotated[Path | None, typer.Option()] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value; repeatable.")] = None,
    hardware: Annotated[str | None, typer.Option(help="Override the detected one.")] = None,
    runtime: Annotated[
        list[str] | None, typer.Option(help="Override the detected runtimes; repeatable.")
    ] = None,
    max_payload_bytes: Annotated[int, typer.Option(help="bytes")] = 512 * 1024 * 1024,
    stall_timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    health_window: Annotated[float, typer.Option(help="seconds")] = 30.0,
    health_probe_interval: Annotated[float, typer.Option(help="seconds")] = 5.0,
    max_error_rate: Annotated[float, typer.Option()] = 0.05,
    telemetry_interval: Annotated[float, typer.Option(help="seconds")] = 5.0,
    telemetry_spool: Annotated[Path | None, typer.Option()] = None,
    warmup_rtol: Annotated[float, typer.Option()] = 1e-3,
    warmup_atol: Annotated[float, typer.Option()] = 1e-3,
) -> None:
    """Runs the agent until SIGTERM or SIGINT."""
    from tandem.agent.agent import Agent

    if password_file is not None:
        password = password_file.read_text().strip()
    config = AgentConfig(
        device_id=device_id,
        broker=BrokerAddress.parse(broker),
        store=store,
        trusted_keys=tuple(trusted_key),
        fleet_keys=tuple(fleet_key or ()),
        username=username,
        password=password,
        tags=parse_tags(tag or []),
        hardware=hardware,
        runtimes=tuple(runtime) if runtime else None,
        max_payload_bytes=max_payload_bytes,
        stall_timeout_s=stall_timeout,
        health_window_s=health_window,
        health_probe_interval_s=health_probe_interval,
        max_error_rate=max_error_rate,
        telemetry_interval_s=telemetry_interval,
        telemetry_spool=telemetry_spool,
        warmup_rtol=warmup_rtol,
        warmup_atol=warmup_atol,
    )
    agent = Agent(config)
    done = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        done.set()
        # Starts the stop now: the loop below then sees the agent end instead of finding
        # `done` at its next poll (up to 0.2 s later, on every SIGTERM).
        agent.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    agent.start()
    while not done.is_set() and not agent.wait(0.2):
        pass
    agent.stop()
    if agent.error is not None:
        raise typer.Exit(1)
