"""Collects the reliability suite's figures and writes them as text at the end of a session.

Each test records one section (calls made, faults injected, inputs tried, failures, data
lost...). Sections of tests that did not run this time are kept from the previous file, so
running one test module refreshes its own figures without erasing the others.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

HEADER = "# tandem reliability and security suite: figures written by tests/reliability"
ROOT = Path(__file__).resolve().parents[2]


def results_path(name: str) -> Path:
    """Where a run's figures go: test-artifacts/ (ignored by git) on an ordinary test run, so
    `make test` leaves the tree clean; bench/results/ (committed) with TANDEM_RECORD_RESULTS=1,
    which is how the committed figures are refreshed."""
    folder = "bench/results" if os.environ.get("TANDEM_RECORD_RESULTS") == "1" else "test-artifacts"
    return ROOT / folder / name


class Figures:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sections: dict[str, dict[str, object]] = {}

    def record(self, section: str, **numbers: object) -> None:
        self.sections.setdefault(section, {}).update(numbers)

    def _previous(self) -> dict[str, list[str]]:
        if not self.path.exists():
            return {}
        found: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in self.path.read_text().splitlines():
            if line.startswith("## "):
                current = found.setdefault(line[3:].strip(), [])
            elif current is not None and line.strip():
                current.append(line)
        return found

    def write(self) -> None:
        if not self.sections:
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        merged: dict[str, list[str]] = self._previous()
        for name, numbers in self.sections.items():
            merged[name] = [f"  {key}: {value}" for key, value in numbers.items()] + [
                f"  (run {stamp}, {os.cpu_count()} cpus)"
            ]
        lines = [
            HEADER,
            "# Timings were taken on a shared machine under contention; counts are exact.",
            "",
        ]
        for name in sorted(merged):
            lines += [f"## {name}", *merged[name], ""]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines))
