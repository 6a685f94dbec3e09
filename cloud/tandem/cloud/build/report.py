"""The zoo's build report: `report.json` (merged across models) and `report.md` from it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tandem.sdk.atomic import PUBLIC, write_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def load_report(out_dir: Path) -> dict[str, Any]:
    path = out_dir / REPORT_JSON
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"models": {}}
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        return {"models": {}}
    return document


def write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    write_atomic(out_dir / REPORT_JSON, text, mode=PUBLIC)
    write_atomic(out_dir / REPORT_MD, render_markdown(report), mode=PUBLIC)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


# Columns shown first in the variant table, in this order; the rest follow alphabetically.
_LEADING = ("runtime", "precision", "accuracy", "size_bytes", "stored_bytes", "latency_ms_batch1")


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = ["# tandem model zoo build report", ""]
    machine = report.get("machine")
    if isinstance(machine, Mapping):
        lines += [f"Built on: {_fmt(machine)}", ""]
    models = report.get("models") or {}
    versions = report.get("versions") or {}
    entries = []
    for name in sorted(set(models) | set(versions)):
        by_version = versions.get(name) or {}
        if by_version:
            entries += [by_version[v] for v in sorted(by_version, key=int)]
        else:
            entries.append(models[name])
    for entry in entries:
        name = entry.get("model", "?")
        lines += [f"## {name} v{entry.get('version', '?')}", ""]
        if "build_seconds" in entry:
            lines += [f"Build time: {entry['build_seconds']:.1f} s", ""]
        metrics = entry.get("metrics") or {}
        if metrics:
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
            lines.append("")
        variants = entry.get("variants") or {}
        if variants:
            keys: set[str] = set()
            for values in variants.values():
                # Long strings (digests, descriptions) stay in report.json only.
                keys.update(
                    k
                    for k, v in values.items()
                    if not isinstance(v, Mapping | list)
                    and not (isinstance(v, str) and len(v) > 16)
                )
            columns = [k for k in _LEADING if k in keys] + sorted(keys - set(_LEADING))
            lines.append("| variant | " + " | ".join(columns) + " |")
            lines.append("| --- " * (len(columns) + 1) + "|")
            for variant in sorted(variants):
                row = variants[variant]
                cells = [_fmt(row[c]) if c in row else "" for c in columns]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
            lines.append("")
        repository = entry.get("repository")
        if isinstance(repository, Mapping):
            lines += [f"Cloud repository: {_fmt(repository)}", ""]
        for note in entry.get("notes") or []:
            lines.append(f"- {note}")
        if entry.get("notes"):
            lines.append("")
    return "\n".join(lines)
