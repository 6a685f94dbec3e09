"""Load a staged variant and check it against its own reference outputs.

`load_runner` is the one seam to the runtimes: the SDK's runtime layer
(`tandem.sdk.runtimes.get_runtime(name).load(manifest, folder)`), the same code the app
will run the model with, so a version that passes here loads there too.

A generative variant (task "generation": a decoder with `past_key.*`/`past_value.*` inputs
that the plain runtimes cannot feed) goes through `load_generator` instead, the SDK's
`LocalGenerator.from_variant`, which is what the app generates with. Its reference is the
build's greedy continuation of a prompt (`input.input_ids` -> `output.tokens`, decoded with
the KV cache and without stopping at EOS); the device's greedy tokens must equal it exactly,
since one different argmax is a different model, whatever the tolerance on floats.
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
from tandem.sdk.local import GENERATION_TASK

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


def load_generator(variant_dir: Path, manifest: Manifest, steps: int) -> Runner:
    """A callable decoding `steps` greedy tokens after `input_ids` with the SDK's generator.

    Every step is taken (an EOS token does not stop it), as the build's reference was made.
    Raises WarmupError when the generator cannot be loaded (no generation.json or tokenizer,
    a config without the cache's shape, a graph ONNX Runtime rejects).
    """
    try:
        from tandem.sdk.generation import LocalGenerator

        generator = LocalGenerator.from_variant(variant_dir)
    except TandemError as exc:
        raise WarmupError(f"the generator could not load {manifest.entrypoint}: {exc}") from exc
    except Exception as exc:  # onnxruntime, tokenizers, json and missing files: translate here
        # The type and the text: a repr drops an OSError's file name, a str a KeyError's type.
        raise WarmupError(
            f"the generator could not load {manifest.entrypoint}: {type(exc).__name__}: {exc}"
        ) from exc

    def run(inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        generator.start([int(t) for t in np.asarray(inputs["input_ids"]).reshape(-1)])
        tokens = [generator.step()[0] for _ in range(steps)]
        return {"tokens": np.asarray([tokens], np.int64)}

    return run


def generation_reference(reference: str, inputs: Arrays, outputs: Arrays) -> int:
    """Checks a generative reference's shape; returns how many tokens it holds."""
    prompt, tokens = inputs.get("input_ids"), outputs.get("tokens")
    if prompt is None or tokens is None:
        raise WarmupError(
            f"{reference} of a generative variant needs input.input_ids and output.tokens, "
            f"it holds inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    for name, array in (("input.input_ids", prompt), ("output.tokens", tokens)):
        if array.ndim != 2 or array.shape[0] != 1 or array.shape[1] < 1:
            raise WarmupError(f"{reference}: {name} has shape {array.shape}, not (1, n >= 1)")
        if not np.issubdtype(array.dtype, np.integer):
            raise WarmupError(f"{reference}: {name} holds {array.dtype}, not token ids")
    return int(tokens.shape[1])


def compare_tokens(got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raises WarmupError naming the first generated token that differs from the reference."""
    have = np.asarray(got["tokens"]).reshape(-1)
    want = np.asarray(expected["tokens"]).reshape(-1)
    if have.shape != want.shape:
        raise WarmupError(f"generated {have.size} tokens, the reference has {want.size}")
    differ = np.flatnonzero(have != want)
    if differ.size:
        first = int(differ[0])
        raise WarmupError(
            f"greedy token {first} of {want.size} after the reference prompt is "
            f"{int(have[first])}, the reference has {int(want[first])} "
            f"({differ.size} of {want.size} tokens differ)"
        )


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
        self.generative = manifest.task == GENERATION_TASK
        if self.generative:
            steps = generation_reference(manifest.reference or "", self.inputs, self.outputs)
            self.runner = load_generator(variant_dir, manifest, steps)
        else:
            self.runner = load_runner(variant_dir, manifest)

    def check(self) -> None:
        """Runs the reference inputs once; raises WarmupError on any failure."""
        try:
            got = self.runner(self.inputs)
        except TandemError as exc:
            raise WarmupError(f"reference run failed: {exc}") from exc
        except Exception as exc:  # runtime errors of any type are a failed probe
            raise WarmupError(f"reference run failed: {exc!r}") from exc
        if self.generative:
            compare_tokens(got, self.outputs)
        else:
            compare_outputs(got, self.outputs, self.rtol, self.atol)


def warm_up(variant_dir: Path, manifest: Manifest, rtol: float, atol: float) -> Probe:
    """Loads the variant and checks it against its reference; returns the probe for later."""
    probe = Probe(variant_dir, manifest, rtol, atol)
    probe.check()
    log.info("warm-up passed: %s v%d %s", manifest.model, manifest.version, manifest.variant)
    return probe
