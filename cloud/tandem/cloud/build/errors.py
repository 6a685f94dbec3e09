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

from tandem.errors import BuildError

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
