"""`tandem keys ...` and `tandem models ...`: signing keys and the model zoo build."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tandem.cloud.build.context import ProgressEvent
from tandem.cloud.build.errors import BuildError, UnknownModelError
from tandem.cloud.build.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Signer,
    generate_keypair,
)

keys_app = typer.Typer(
    help="Signing keys for model manifests (ed25519).",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(
    help="Build and inspect the model zoo.", no_args_is_help=True, add_completion=False
)

# Progress and messages go to stderr; the summary table goes to stdout.
err = Console(stderr=True)
out = Console()


@keys_app.command("generate")
def keys_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for signing.key and signing.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Write a new ed25519 key pair: signing.key (mode 0600) and signing.pub."""
    key_path, pub_path = generate_keypair(out_dir, overwrite=force)
    signer = Signer.from_file(key_path)
    err.print(f"private key: {key_path} (mode 0600; keep it secret)")
    err.print(f"public key:  {pub_path} (give this to devices)")
    out.print(f"key id {signer.keyid}")


def _parse_models(text: str) -> tuple[str, ...]:
    from tandem.cloud.build.pipeline import known_models

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UnknownModelError("--models names no model")
    models = known_models()
    for name in names:
        if name not in models:
            raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(models)}")
    return names


@contextmanager
def _progress_display(models: tuple[str, ...]) -> Iterator[Any]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[model]:<8}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, TaskID] = {
        name: progress.add_task("waiting", total=None, model=name) for name in models
    }

    def on_event(event: ProgressEvent) -> None:
        task = tasks.get(event.model)
        if task is None:
            return
        progress.update(
            task,
            description=event.step,
            completed=event.completed,
            total=event.total or None,
        )

    with progress:
        yield on_event


@contextmanager
def _build_logging() -> Iterator[None]:
    """During a build the progress bars say what happens; logs show only warnings then.

    Converters log every lowering step at INFO (litert-torch through the root logger, LiteRT
    and XNNPACK from C++), which would bury the progress display. `tandem -v` keeps it all.
    """
    root = logging.getLogger()
    if root.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ absl logging in LiteRT
    previous = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(previous)


def _format_bytes(size: Any) -> str:
    if not isinstance(size, int | float):
        return ""
    return f"{size / 1024:.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MiB"


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else ""


def _summary(report: Mapping[str, Any], models: tuple[str, ...]) -> None:
    run = report.get("run") or {}
    for name in models:
        entry = (report.get("models") or {}).get(name)
        if not entry:
            continue
        cached = name in (run.get("cached") or [])
        metrics = entry.get("metrics") or {}
        title = f"{name} v{entry.get('version')}" + (" (cached)" if cached else "")
        table = Table(title=title, title_justify="left")
        for column in ("variant", "runtime", "precision", "quality", "size", "latency b=1"):
            table.add_column(column)
        for variant, row in sorted((entry.get("variants") or {}).items()):
            quality = (
                _percent(row["accuracy"])
                if "accuracy" in row
                else (f"cos {row['cosine_mean']:.4f}" if "cosine_mean" in row else "")
            )
            if "greedy_agreement" in row:  # generative: greedy agreement with the full model
                quality = f"agree {_percent(row['greedy_agreement'])}"
            latency = row.get("latency_ms_batch1")
            table.add_row(
                variant,
                str(row.get("runtime", "")),
                str(row.get("precision", "")),
                quality,
                _format_bytes(row.get("size_bytes")),
                f"{latency:.3f} ms" if isinstance(latency, int | float) else "",
            )
        out.print(table)
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        out.print(", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
        if "build_seconds" in entry:
            out.print(f"build time {entry['build_seconds']:.1f} s")


@models_app.command("build")
def models_build(
    out_dir: Annotated[Path, typer.Option("--out", help="Zoo folder to build into.")],
    models: Annotated[
        str, typer.Option("--models", help="Comma-separated models to build.")
    ] = "digits,minilm",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when up to date.")] = False,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key", help="Signing key (default: OUT/keys/signing.key, generated if absent)."
        ),
    ] = None,
    version: Annotated[int, typer.Option("--version", min=1, help="Version number to build.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Root of every random choice.")] = 0,
    student: Annotated[
        str,
        typer.Option(
            "--student",
            "--digits-student",
            help="A distilled model's student: 'normal', or 'bad' (shuffled labels; for tests).",
        ),
    ] = "normal",
    spec: Annotated[
        Path | None,
        typer.Option("--spec", help="Build a user's model from a spec file (docs/own-model.md)."),
    ] = None,
) -> None:
    """Train, quantize, export, sign and package the models; print the report."""
    from tandem.cloud.build.pipeline import build_zoo

    names = _parse_models(models) if spec is None else ()
    if key is None:
        default = out_dir / "keys" / PRIVATE_KEY_FILE
        if not default.exists():
            key_path, pub_path = generate_keypair(default.parent)
            err.print(
                f"no signing key at {default}: generated a new pair "
                f"({key_path}, public key {pub_path.name}); devices must trust it"
            )
        key = default
    elif not key.exists():
        raise BuildError(f"signing key {key} does not exist (create one: tandem keys generate)")
    if spec is not None:
        from tandem.cloud.build.spec import load_spec
        from tandem.cloud.build.user import build_from_spec

        names = (load_spec(spec).name,)
        with _build_logging(), _progress_display(names) as on_event:
            report = build_from_spec(
                spec,
                out_dir,
                key_path=key,
                version=version,
                seed=seed,
                options={"student_variant": student} if student != "normal" else None,
                force=force,
                progress=on_event,
            )
        _summary(report, names)
        for note in report["models"][names[0]].get("notes") or []:
            err.print(note)
        return
    options = {n: {"student_variant": student} for n in names} if student != "normal" else None
    with _build_logging(), _progress_display(names) as on_event:
        report = build_zoo(
            out_dir,
            names,
            progress=on_event,
            force=force,
            key_path=key,
            version=version,
            seed=seed,
            options=options,
        )
    _summary(report, names)
    run = report.get("run") or {}
    built = ", ".join(run.get("built") or []) or "-"
    cached = ", ".join(run.get("cached") or []) or "-"
    err.print(
        f"zoo at {out_dir} (report.md, report.json); built: {built}; cached: {cached};"
        f" {run.get('seconds', 0):.1f} s"
    )


@models_app.command("list")
def models_list(
    zoo: Annotated[
        Path, typer.Option("--zoo", help="A zoo folder built by `tandem models build`.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show the models, versions and variants in a zoo."""
    from tandem.cloud.build.report import load_report

    report = load_report(zoo)
    artifacts = zoo / "artifacts"
    if not artifacts.is_dir():
        raise BuildError(f"{zoo} has no artifacts/ folder; build it with tandem models build")
    listing: dict[str, dict[str, list[str]]] = {}
    for model_dir in sorted(p for p in artifacts.iterdir() if p.is_dir()):
        versions = sorted(
            (p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        listing[model_dir.name] = {
            v.name: sorted(x.name for x in v.iterdir() if x.is_dir() and not x.name.startswith("."))
            for v in versions
        }
    if as_json:
        out.print_json(json.dumps({"artifacts": listing, "report": report}))
        return
    table = Table(title=f"zoo {zoo}", title_justify="left")
    for column in ("model", "version", "variants"):
        table.add_column(column)
    for model, versions_map in listing.items():
        for version, variants in versions_map.items():
            table.add_row(model, version, ", ".join(variants))
    out.print(table)
    pub = zoo / "keys" / PUBLIC_KEY_FILE
    if pub.exists():
        out.print(f"public key: {pub}")
