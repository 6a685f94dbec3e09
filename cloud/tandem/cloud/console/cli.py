"""The operator CLI: `tandem rollout ...`, `tandem devices list`, and `models list`.

Every command talks to a running fleet service's REST API: ``--url`` (or ``TANDEM_URL``) and
``--token`` (or ``TANDEM_TOKEN``). Output is rich tables; ``rollout status --watch`` keeps a
live view until the rollout completes (exit 0) or is aborted (exit 1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tandem.errors import ConfigError
from tandem.sdk.tags import parse_tags

from .client import ApiError, FleetClient

console = Console()
err_console = Console(stderr=True)

GATE_METRICS = (
    "error_rate",
    "p95_latency_ratio",
    "fallback_rate",
    "shadow_agreement",
    "failed_device_pct",
    "estimated_accuracy",
    "acceptance_rate",
    "escalation_rate",
    "tokens_per_s_ratio",
)
STATE_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "rolled_back": "bright_black",
    "installing": "blue",
    "assigned": "cyan",
}
STATUS_STYLES = {
    "running": "green",
    "paused": "yellow",
    "completed": "blue",
    "aborted": "red",
}

Url = Annotated[str, typer.Option("--url", envvar="TANDEM_URL", help="Fleet service REST URL.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="TANDEM_TOKEN", help="Bearer token of the REST API."),
]
DEFAULT_URL = "http://127.0.0.1:8080"

rollout_app = typer.Typer(
    help="Staged rollouts: create, list, watch, pause, resume, promote, abort.",
    no_args_is_help=True,
)
devices_app = typer.Typer(help="The devices of the fleet.", no_args_is_help=True)


@contextmanager
def _client(url: str, token: str | None) -> Iterator[FleetClient]:
    try:
        with FleetClient(url, token) as client:
            yield client
    except ApiError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


# --- parsing ------------------------------------------------------------------------------


def parse_stage(spec: str) -> dict[str, float]:
    """``PERCENT[:MIN_SOAK_S]``, e.g. ``10:60``."""
    percent, _, soak = spec.partition(":")
    try:
        return {"percent": float(percent), "min_soak_s": float(soak) if soak else 0.0}
    except ValueError:
        raise ConfigError("--stage", f"{spec!r} is not PERCENT[:MIN_SOAK_S]") from None


def parse_gate(spec: str) -> dict[str, Any]:
    """``METRIC:THRESHOLD[:MIN_SAMPLES]``, e.g. ``error_rate:0.02:50``; a threshold with a
    leading ``+`` bounds the difference to the baseline version instead (a relative gate):
    ``error_rate:+0.01`` fails when the new version's error rate is 1 point above the old's."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in GATE_METRICS:
        raise ConfigError(
            "--gate",
            f"{spec!r} is not METRIC:[+]THRESHOLD[:MIN_SAMPLES] with METRIC one of "
            + ", ".join(GATE_METRICS),
        )
    relative = parts[1].startswith("+")
    try:
        gate: dict[str, Any] = {"metric": parts[0], "threshold": float(parts[1].lstrip("+"))}
        if len(parts) == 3:
            gate["min_samples"] = int(parts[2])
    except ValueError:
        raise ConfigError("--gate", f"{spec!r}: threshold and samples must be numbers") from None
    if relative:
        gate["relative"] = True
    return gate


def _opt(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


# --- rendering ----------------------------------------------------------------------------


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    d = max(0.0, time.time() - t)
    if d < 60:
        return f"{d:.0f} s ago"
    if d < 3600:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _gate_value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric in ("p95_latency_ratio", "tokens_per_s_ratio"):
        return f"x{v:.2f}"
    if metric == "failed_device_pct":
        return f"{v:.1f}%"
    return _pct(v)


# Gates whose metric fails below its threshold (the others fail above it).
HIGHER_IS_BETTER = frozenset(
    {"shadow_agreement", "estimated_accuracy", "acceptance_rate", "tokens_per_s_ratio"}
)


def _interval(low: float | None, high: float | None) -> str:
    """The gate's confidence bounds, on what it compares: the value, its difference to the
    baseline for a relative gate, the rank statistic (AUC) for latency; `why` says which."""
    if low is None or high is None:
        return "-"
    return f"[{low:.3g}, {high:.3g}]"


def _baseline(metric: str, v: float | None) -> str:
    if metric == "p95_latency_ratio":  # the ratio's baseline is the baseline's p95 itself
        return "-" if v is None else f"{v:.2f} ms"
    if metric == "tokens_per_s_ratio":  # the baseline's median tokens/s
        return "-" if v is None else f"{v:.1f} tok/s"
    return _gate_value(metric, v)


def rollouts_table(rollouts: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Rollouts", title_justify="left")
    for col in ("rollout", "model", "version", "baseline", "status", "stage", "targets", "by"):
        table.add_column(col)
    table.add_column("created", justify="right")
    for r in rollouts:
        stages = r.get("stages") or []
        idx = int(r.get("stage_index", 0))
        pct = stages[idx]["percent"] if idx < len(stages) else "?"
        table.add_row(
            r["rollout_id"],
            r["model"],
            f"v{r['version']}",
            "-" if r.get("baseline_version") is None else f"v{r['baseline_version']}",
            _status(r["status"]),
            f"{idx + 1}/{len(stages)} ({pct}%)",
            ", ".join(f"{k}={v}" for k, v in (r.get("selector") or {}).items()) or "all",
            r.get("created_by", ""),
            _ago(r.get("created_at")),
        )
    return table


def _bar(states: Mapping[str, int], target: int, width: int = 30) -> Text:
    total = max(target, sum(states.values()), 1)
    text = Text()
    used = 0
    for state in ("succeeded", "failed", "rolled_back", "installing", "assigned"):
        n = states.get(state, 0)
        cells = round(width * n / total)
        cells = min(cells, width - used)
        text.append("█" * cells, style=STATE_STYLES[state])
        used += cells
    text.append("░" * (width - used), style="bright_black")
    return text


def rollout_view(detail: Mapping[str, Any]) -> Group:
    """The status of one rollout: header, stage progress, gates and the latest events."""
    r = detail["rollout"]
    head = Text.assemble(
        (f"{r['rollout_id']}  ", "bold"),
        f"{r['model']} v{r['version']}",
        ("" if r.get("baseline_version") is None else f" (baseline v{r['baseline_version']})"),
        "  ",
        _status(r["status"]),
        f"  {detail['targeted_devices']} targeted",
    )
    if r.get("paused_reason"):
        head.append(f"\n{r['paused_reason']}", style="yellow")
    stages = Table(title="Stages", title_justify="left", expand=False)
    for col in ("stage", "percent", "soak", "progress", "healthy", "failed", "in flight", "phase"):
        stages.add_column(
            col, justify="right" if col in ("percent", "healthy", "failed") else "left"
        )
    for st in detail["stages"]:
        s = st["states"]
        stages.add_row(
            str(st["index"] + 1),
            f"{st['percent']:g}%",
            f"{st['min_soak_s']:g}s"
            + (
                f" ({st['soak_left_s']:.0f}s left)"
                if st.get("soak_left_s") is not None and st["phase"] == "running"
                else ""
            ),
            _bar(s, st["cohort_target"]),
            f"{s['succeeded']}/{st['cohort_target']}",
            str(s["failed"] + s["rolled_back"]),
            str(s["installing"] + s["assigned"]),
            st["phase"],
        )
    gates = Table(title=f"Gates (stage {r['stage_index'] + 1})", title_justify="left")
    for col in ("metric", "value", "interval", "threshold", "baseline", "samples", "result"):
        gates.add_column(col)
    gates.add_column("why", overflow="fold")
    for g in detail.get("gates") or []:
        op = ">=" if g["metric"] in HIGHER_IS_BETTER else "<="
        result = {True: Text("pass", "green"), False: Text("FAIL", "red")}.get(
            g.get("passed"), Text("waiting", "yellow")
        )
        gates.add_row(
            g["metric"],
            _gate_value(g["metric"], g.get("value")),
            _interval(g.get("low"), g.get("high")),
            f"{op} {_gate_value(g['metric'], g['threshold'])}",
            _baseline(g["metric"], g.get("baseline")),
            str(g.get("samples", 0)),
            result,
            g.get("reason") or "",
        )
    events = Table(title="Latest events", title_justify="left")
    for col in ("time", "event", "by", "stage", "device"):
        events.add_column(col)
    for e in list(detail.get("events") or [])[:8]:
        events.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])),
            e["kind"],
            e["actor"],
            "" if e.get("stage_index") is None else str(e["stage_index"] + 1),
            e.get("device_id") or "",
        )
    parts: list[Any] = [Panel(head), stages]
    if detail.get("gates"):
        parts.append(gates)
    parts.append(events)
    return Group(*parts)


def devices_table(fleet: Mapping[str, Any]) -> Table:
    table = Table(
        title=f"Devices: {fleet['online']} online of {fleet['total']}", title_justify="left"
    )
    for col in ("device", "presence", "hardware", "runtimes", "tags", "versions"):
        table.add_column(col)
    for col in ("p95", "fallback", "last seen"):
        table.add_column(col, justify="right")
    for d in fleet["devices"]:
        lt = d.get("last_telemetry") or {}
        p95 = lt.get("p95_latency_ms")
        table.add_row(
            d["device_id"],
            Text("online", "green") if d["online"] else Text("offline", "red"),
            d.get("hardware") or "-",
            ", ".join(d.get("runtimes") or []) or "-",
            ", ".join(f"{k}={v}" for k, v in (d.get("tags") or {}).items()),
            ", ".join(f"{m} v{v}" for m, v in (d.get("active_versions") or {}).items()),
            "-" if p95 is None else f"{p95:.2f} ms",
            _pct(lt.get("fallback_rate")),
            _ago(d.get("last_seen")),
        )
    return table


def models_table(models: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Models", title_justify="left")
    for col in ("model", "task", "versions"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], m.get("task") or "-", ", ".join(f"v{v}" for v in m["versions"]))
    return table


# --- commands -----------------------------------------------------------------------------


@rollout_app.command("create")
def create(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to roll out.")],
    stage: Annotated[
        list[str] | None,
        typer.Option("--stage", "-s", help="PERCENT[:MIN_SOAK_S], repeat in order."),
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            "-g",
            help="METRIC:THRESHOLD[:MIN_SAMPLES], checked at every stage;"
            " METRIC:+THRESHOLD bounds the difference to the baseline version.",
        ),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="Target devices with key=value.")
    ] = None,
    baseline: Annotated[
        int | None, typer.Option(help="Baseline version (default: the previous one).")
    ] = None,
    on_gate_failure: Annotated[
        str, typer.Option(help="What a failing gate does: abort or pause.")
    ] = "abort",
    device_timeout: Annotated[
        float, typer.Option(help="Seconds a device may take to report healthy.")
    ] = 600.0,
    rate: Annotated[float, typer.Option(help="New devices per second; 0 = unlimited.")] = 0.0,
    false_abort_rate: Annotated[
        float,
        typer.Option(help="Accepted chance of stopping a good version, over the whole rollout."),
    ] = 0.01,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Create a staged rollout of MODEL VERSION."""
    stages = [_opt(parse_stage, s) for s in (stage or ["10:60", "50:60", "100"])]
    gates = [_opt(parse_gate, g) for g in (gate or [])]
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "stages": [{**s, "gates": gates} for s in stages],
        "selector": _opt(parse_tags, tag or [], "--tag"),
        "on_gate_failure": on_gate_failure,
        "device_timeout_s": device_timeout,
        "max_assignments_per_s": rate,
        "false_abort_rate": false_abort_rate,
    }
    if baseline is not None:
        body["baseline_version"] = baseline
    with _client(url, token) as client:
        r = client.create_rollout(body)
        console.print(f"created rollout [bold]{r['rollout_id']}[/bold]")
        console.print(rollout_view(client.rollout_detail(r["rollout_id"])))


@rollout_app.command("list")
def list_rollouts(
    status: Annotated[
        list[str] | None, typer.Option(help="Only these statuses (running, paused, ...).")
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List rollouts, newest first."""
    with _client(url, token) as client:
        console.print(rollouts_table(client.rollouts(status or [])))


@rollout_app.command("status")
def status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Live view until it ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Show a rollout's stages, gates and events; with --watch, follow it until it ends
    (exit 0 when it completes, 1 when it is aborted)."""
    with _client(url, token) as client:
        detail = client.rollout_detail(rollout_id)
        if not watch:
            console.print(rollout_view(detail))
            return
        with Live(rollout_view(detail), console=console, refresh_per_second=4) as live:
            while detail["rollout"]["status"] not in ("completed", "aborted"):
                time.sleep(max(0.1, interval))
                detail = client.rollout_detail(rollout_id)
                live.update(rollout_view(detail))
        final = detail["rollout"]["status"]
        console.print(f"rollout {rollout_id} {final}")
        if final != "completed":
            raise typer.Exit(1)


def _command(cmd: str, help_text: str) -> None:
    def run(
        rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
        url: Url = DEFAULT_URL,
        token: Token = None,
    ) -> None:
        with _client(url, token) as client:
            r = client.command(rollout_id, cmd)
            console.print(f"rollout {rollout_id}: {cmd} -> ", _status(r["status"]))

    run.__doc__ = help_text
    rollout_app.command(cmd)(run)


_command("pause", "Pause a running rollout (no new devices; gates keep being watched).")
_command("resume", "Resume a paused rollout; gates judge the telemetry from now on.")
_command("promote", "Skip the rest of the current stage's soak and gates: go to the next stage.")


@rollout_app.command("abort")
def abort(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Abort a rollout: every device it touched goes back to its baseline version."""
    if not yes and not typer.confirm(
        f"Abort rollout {rollout_id} and roll every touched device back?"
    ):
        raise typer.Exit(1)
    with _client(url, token) as client:
        r = client.command(rollout_id, "abort")
        console.print(f"rollout {rollout_id}: abort -> ", _status(r["status"]))


@devices_app.command("list")
def list_devices(
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="key=value filter.")] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="Only online or offline devices.")
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List devices with presence, hardware, runtimes, tags, versions and last telemetry."""
    tags = _opt(parse_tags, tag or [], "--tag")
    with _client(url, token) as client:
        console.print(devices_table(client.fleet(tags, online)))


def models_list(url: Url = DEFAULT_URL, token: Token = None) -> None:
    """List the models the fleet service knows, with their versions."""
    with _client(url, token) as client:
        console.print(models_table(client.models()))


def register_models_list(app: typer.Typer) -> None:
    """Adds `list` (models of a running fleet service) to the `tandem models` app."""
    app.command("list")(models_list)
