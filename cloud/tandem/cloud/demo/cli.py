"""`tandem demo`: the whole system on embedded defaults, in one command."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tandem.errors import TandemError

from .config import DemoConfig
from .processes import Interrupted, install_signal_handlers
from .story import Story


def _sleep_forever() -> None:
    while True:  # SIGINT / SIGTERM raise Interrupted out of here
        time.sleep(3600)


def demo(
    devices: Annotated[
        int, typer.Option("--devices", "-n", help="Simulated devices (spread over 4 runtimes).")
    ] = 20,
    duration: Annotated[
        float,
        typer.Option(
            help="Seconds of traffic at least; a tenth of it (2..60 s) is each stage's soak."
        ),
    ] = 60.0,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Keep everything up after the story.")
    ] = False,
    zoo: Annotated[
        Path, typer.Option(help="Model zoo folder (built here when missing; cached).")
    ] = Path("zoo"),
    workdir: Annotated[
        Path | None,
        typer.Option(help="Work folder for DBs, stores, logs (default: a new temp folder)."),
    ] = None,
    rate: Annotated[float, typer.Option(help="Requests per second per device.")] = 4.0,
    broker: Annotated[
        str,
        typer.Option(
            help="auto: Mosquitto when installed, else the embedded Python broker; "
            "or mosquitto, embedded."
        ),
    ] = "auto",
) -> None:
    """Build the models, start cloud tier, broker, fleet and devices, roll out a good and a
    bad version, and print what happened. Ctrl-C stops every process it started."""
    root = logging.getLogger()
    if root.level > logging.DEBUG:  # `tandem -v demo` keeps the INFO logs
        root.setLevel(logging.WARNING)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 120  # logs and pipes: fewer wrapped lines than the default 80
    try:
        config = DemoConfig(
            zoo=zoo,
            workdir=workdir or Path(tempfile.mkdtemp(prefix="tandem-demo-")),
            devices=devices,
            duration_s=duration,
            keep_running=keep_running,
            rate_per_s=rate,
            broker=broker,
        )
    except TandemError as exc:
        raise typer.BadParameter(str(exc)) from exc
    restore = install_signal_handlers()
    story = Story(config, console)
    try:
        story.run(wait_forever=_sleep_forever)
    except Interrupted as exc:
        console.print(f"\n[yellow]{exc}: stopped every process the demo started[/]")
        raise typer.Exit(130) from None
    except TandemError as exc:
        console.print(f"[red]error:[/] {exc}")
        console.print(f"logs: {config.workdir / 'logs'}")
        raise typer.Exit(1) from None
    finally:
        restore()
    if story.problems:
        console.print("[red]the story did not go as it should:[/]")
        for problem in story.problems:
            console.print(f"  - {problem}")
        raise typer.Exit(1)
    console.print(f"[green]demo complete[/]; logs and summary.json in {config.workdir}")
