"""Errors of the model build pipeline, under `tandem.errors.BuildError`::

BuildError
├── KeyFileError          a signing key cannot be read, or would be overwritten
├── UnknownModelError     a model name the pipeline does not know
├── ModelUnavailableError a known model whose builder is not installed or importable
├── TrainingError         training did not reach its accuracy target
├── ExportError           a runtime export or quantization failed
├── QualityGateError      an exported variant misses its accuracy or similarity gate
└── SpecError             a build spec is wrong (field or file named)
    ├── SpecDataError     calibration/validation data do not fit the model inputs
    └── ModelLoadError    the model a spec names cannot be loaded
"""

from __future__ import annotations

import logging

from tandem.errors import BuildError

log = logging.getLogger(__name__)

__all__ = [
    "BuildError",
    "ExportError",
    "KeyFileError",
    "ModelUnavailableError",
    "ModelLoadError",
    "QualityGateError",
    "SpecDataError",
    "SpecError",
    "TrainingError",
    "UnknownModelError",
    "brief",
]


class KeyFileError(BuildError):
    """A signing key file is missing, unreadable, of the wrong kind, or would be overwritten."""


class UnknownModelError(BuildError):
    """The pipeline has no builder of that name."""


class ModelUnavailableError(BuildError):
    """The model is known but its builder module cannot be imported."""


class TrainingError(BuildError):
    """A trained model missed the accuracy it must reach."""


class ExportError(BuildError):
    """Exporting or quantizing for one runtime failed; the message names the runtime."""


class QualityGateError(BuildError):
    """An exported variant is too far from the model it was exported from."""


class SpecError(BuildError):
    """A build spec (`tandem models build --spec`) is wrong: the message names the field or file."""


class SpecDataError(SpecError):
    """Calibration or validation data do not fit the model's inputs (names, shapes, dtypes)."""


class ModelLoadError(SpecError):
    """The model a spec names cannot be loaded by its runtime."""


def brief(exc: BaseException, limit: int = 240) -> str:
    """One line of a runtime's many-line error, for the report; the whole text goes to the log.

    OpenVINO's conversion errors span a dozen lines of C++ source paths; what a user acts on is
    its summary (the operators it cannot convert) or, failing that, the last line that is not a
    source location.
    """
    text = str(exc)
    log.debug("full error: %s", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        return line if len(line) <= limit else line[: limit - 3] + "..."
    joined = " ".join(lines)
    start = joined.find("Summary:")
    if start >= 0:
        line = joined[start + len("Summary:") :].replace("-- ", "").strip()
    else:
        useful = [
            x for x in lines if not (x.startswith(("Exception from", "Check ")) or ".cpp:" in x)
        ]
        line = useful[-1] if useful else lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
