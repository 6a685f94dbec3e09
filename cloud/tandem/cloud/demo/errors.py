"""Errors of `tandem demo`, under `tandem.errors.TandemError`::

DemoError
├── PrerequisiteError   something the demo needs is not installed (says how to install it)
├── ChildFailedError    a process the demo started exited or never became ready
└── StoryError          the story did not go as it must (a rollout stuck, a device missing)
"""

from __future__ import annotations

from tandem.errors import TandemError


class DemoError(TandemError):
    """The demo could not run to its end."""


class PrerequisiteError(DemoError):
    """A program or package the demo needs is missing; the message says how to install it."""


class ChildFailedError(DemoError):
    """A process the demo started exited early or did not become ready in time."""


class StoryError(DemoError):
    """A step of the story did not reach its expected state in time."""
