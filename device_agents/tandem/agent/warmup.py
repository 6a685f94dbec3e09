"""Load a staged variant and check it against its own reference outputs.

`load_runner` is the one seam to the runtimes: the SDK's runtime layer
(`tandem.sdk.runtimes.get_runtime(name).load(manifest, folder)`), the same code the app
will run the model with, so a version that passes here loads there too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.agent.errors import WarmupError
from tandem.errors import TandemError
from tandem.sdk.artifacts import Manifest, load_npz, split_reference

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
Runner = Callable[[Mapping[str, np.ndarray[Any, Any]]], Arrays]


def load_runner(variant_dir: Path, manifest: Manifest) -> Runner:
    """A callable running the variant through the SDK's runtime for `manifest.runtime`.

    Raises WarmupError when it cannot be loaded (unknown runtime, missing package, a model
    the runtime rejects).
    """
    from tandem.sdk.runtimes import get_runtime

    try:
        backend = get_runtime(manifest.runtime).load(manifest, variant_dir)
    except TandemError as exc:
        raise WarmupError(
            f"{manifest.runtime} could not load {manifest.entrypoint}: {exc}"
        ) from exc
    except Exception as exc:  # runtimes raise anything; translate at the boundary
        raise WarmupError(
            f"{manifest.runtime} could not load {manifest.entrypoint}: {exc!r}"
        ) from exc
    return lambda inputs: dict(backend.run(dict(inputs)))


def reference_io(variant_dir: Path, manifest: Manifest) -> tuple[Arrays, Arrays]:
    if not manifest.reference:
        raise WarmupError(f"{manifest.model} v{manifest.version} has no reference inputs")
    try:
        arrays = load_npz(variant_dir / manifest.reference)
    except (OSError, ValueError) as exc:
        raise WarmupError(f"cannot read {manifest.reference}: {exc}") from exc
    inputs, outputs = split_reference(arrays)
    if not inputs or not outputs:
        raise WarmupError(f"{manifest.reference} holds no input./output. arrays")
    return inputs, outputs


def compare_outputs(
    got: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float
) -> None:
    """Raises WarmupError naming the first output that is missing or out of tolerance."""
    for name, want in expected.items():
        if name not in got:
            raise WarmupError(f"output {name!r} missing from the runtime's result")
        have = np.asarray(got[name])
        if have.shape != np.shape(want):
            raise WarmupError(f"output {name!r}: shape {have.shape} != reference {np.shape(want)}")
        if not np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=False):
            worst = float(np.max(np.abs(have.astype(np.float64) - np.asarray(want, np.float64))))
            raise WarmupError(
                f"output {name!r} differs from the reference by up to {worst:.6g} "
                f"(rtol={rtol}, atol={atol})"
            )


class Probe:
    """A loaded variant and its reference inputs, runnable again and again (health probe)."""

    def __init__(self, variant_dir: Path, manifest: Manifest, rtol: float, atol: float) -> None:
        self.manifest = manifest
        self.rtol = rtol
        self.atol = atol
        self.inputs, self.outputs = reference_io(variant_dir, manifest)
        self.runner = load_runner(variant_dir, manifest)

    def check(self) -> None:
        """Runs the reference inputs once; raises WarmupError on any failure."""
        try:
            got = self.runner(self.inputs)
        except TandemError as exc:
            raise WarmupError(f"reference run failed: {exc}") from exc
        except Exception as exc:  # runtime errors of any type are a failed probe
            raise WarmupError(f"reference run failed: {exc!r}") from exc
        compare_outputs(got, self.outputs, self.rtol, self.atol)


def warm_up(variant_dir: Path, manifest: Manifest, rtol: float, atol: float) -> Probe:
    """Loads the variant and checks it against its reference; returns the probe for later."""
    probe = Probe(variant_dir, manifest, rtol, atol)
    probe.check()
    log.info("warm-up passed: %s v%d %s", manifest.model, manifest.version, manifest.variant)
    return probe
